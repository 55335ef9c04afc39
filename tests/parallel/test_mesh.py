"""Mesh construction, logical-axis sharding, and sharded == unsharded on 8 virtual CPU devices.

The reference for the toy computation is a float64 numpy implementation of the same MLP loss and
gradient (written out by hand here, not via JAX); float32 sharded results must agree to 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from iapo_jax.parallel.mesh import (
    AXES,
    abstract_params,
    logical_to_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_batch,
    shard_params,
)

MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 1)]


class ToyMLP(nnx.Module):
    """Embedding -> ReLU MLP -> vocab logits, every parameter named with logical axes."""

    def __init__(self, vocab=16, embed=8, mlp=32, heads=3, *, rngs):
        init = lambda shape: jax.random.normal(rngs.params(), shape) * 0.3  # noqa: E731
        self.embedding = nnx.Param(init((vocab, embed)), out_sharding=("vocab", "embed"))
        self.up = nnx.Param(init((embed, mlp)), out_sharding=("embed", "mlp"))
        self.down = nnx.Param(init((mlp, embed)), out_sharding=("mlp", "embed"))
        self.heads = nnx.Param(init((heads, embed)), out_sharding=("kv_heads", "embed"))
        self.bias = nnx.Param(jnp.zeros((mlp,)))  # no names: replicated


def toy_loss(params, tokens, targets):
    h = params["embedding"][tokens]  # [B, E]
    h = h + jax.nn.relu(h @ params["up"] + params["bias"]) @ params["down"]
    h = h + params["heads"].sum(0)
    logits = h @ params["embedding"].T
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=1))


def numpy_loss_and_grad(p, tokens, targets):
    """float64 forward and hand-written backward of toy_loss."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    e0 = p["embedding"][tokens]
    pre = e0 @ p["up"] + p["bias"]
    act = np.maximum(pre, 0.0)
    h = e0 + act @ p["down"] + p["heads"].sum(0)
    logits = h @ p["embedding"].T
    logits -= logits.max(1, keepdims=True)
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    b = len(tokens)
    loss = -np.mean(np.log(prob[np.arange(b), targets]))
    dlogits = prob.copy()
    dlogits[np.arange(b), targets] -= 1.0
    dlogits /= b
    g = {k: np.zeros_like(v) for k, v in p.items()}
    g["embedding"] += dlogits.T @ h
    dh = dlogits @ p["embedding"]
    g["heads"] += np.broadcast_to(dh.sum(0), p["heads"].shape)
    g["down"] += act.T @ dh
    dpre = (dh @ p["down"].T) * (pre > 0)
    g["bias"] += dpre.sum(0)
    g["up"] += e0.T @ dpre
    de0 = dh + dpre @ p["up"].T
    np.add.at(g["embedding"], tokens, de0)
    return loss, g


def _make_model():
    with nnx.use_eager_sharding(False):
        return ToyMLP(rngs=nnx.Rngs(0))


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return make_mesh(*shape, devices=devices)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 16, size=16).astype(np.int32), rng.integers(0, 16, size=16).astype(np.int32)


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_sharded_loss_and_grad_match_float64_reference(shape, batch):
    assert len(jax.devices()) == 8
    mesh = _mesh(shape)
    assert tuple(mesh.shape[a] for a in AXES) == shape
    state = nnx.state(_make_model(), nnx.Param)
    host = {k: np.asarray(v) for k, v in nnx.to_pure_dict(state).items()}
    sharded = shard_params(state, mesh)
    params = nnx.to_pure_dict(sharded)
    tokens, targets = shard_batch(batch, mesh)

    loss, grads = jax.jit(jax.value_and_grad(toy_loss))(params, tokens, targets)
    ref_loss, ref_grads = numpy_loss_and_grad(host, *batch)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for name, ref in ref_grads.items():
        np.testing.assert_allclose(np.asarray(grads[name]), ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_parameter_shardings_follow_the_rules():
    mesh = _mesh((2, 2, 2))
    state = shard_params(nnx.state(_make_model(), nnx.Param), mesh)
    specs = {k[0]: v.get_value().sharding.spec for k, v in state.flat_state()}
    assert specs["embedding"] == P("tensor", "fsdp")
    assert specs["up"] == P("fsdp", "tensor")
    assert specs["down"] == P("tensor", "fsdp")
    assert specs["heads"] == P(None, "fsdp")  # 3 KV heads do not split over tensor=2: replicated
    assert specs["bias"] == P()
    # Shards really are split: each device holds a quarter of `up` (fsdp=2 x tensor=2).
    up = state["up"].get_value()
    assert up.addressable_shards[0].data.shape == (4, 16)
    # Metadata survives, and the abstract form carries the same shardings.
    assert state["up"].get_metadata()["out_sharding"] == ("embed", "mlp")
    abstract = abstract_params(nnx.state(_make_model(), nnx.Param), mesh)
    assert isinstance(abstract["up"].get_value(), jax.ShapeDtypeStruct)
    assert abstract["up"].get_value().sharding.spec == P("fsdp", "tensor")
    shardings = param_shardings(nnx.state(_make_model(), nnx.Param), mesh)
    assert shardings["down"].get_value().spec == P("tensor", "fsdp")


def test_activation_and_cache_specs():
    mesh = _mesh((2, 2, 2))
    # 'batch' takes data and fsdp; 'embed' would want fsdp too but it is already used.
    assert logical_to_spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"), None, None)
    cache = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
    assert logical_to_spec(cache, mesh, shape=(2, 8, 32, 4, 16)) == P(None, ("data", "fsdp"), None, "tensor", None)
    # A batch of 2 rows cannot take both axes of size 2: keeps the first that divides.
    assert logical_to_spec(cache, mesh, shape=(2, 2, 32, 4, 16)) == P(None, "data", None, "tensor", None)
    sharding = logical_to_sharding(("batch", None), mesh)
    x = jax.device_put(jnp.ones((8, 3)), sharding)
    assert x.addressable_shards[0].data.shape == (2, 3)


def test_shard_batch_places_rows_on_data_axes():
    mesh = _mesh((4, 2, 1))
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    out = shard_batch({"x": x}, mesh)["x"]
    assert out.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(out), x)
    assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}


def test_mesh_fill_axis_and_single_device():
    assert dict(make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    single = make_mesh(devices=jax.devices()[:1])
    assert dict(single.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(data=3), ["data=3", "8"]),
        (dict(data=2, fsdp=2, tensor=3), ["12", "8"]),
        (dict(data=-1, fsdp=3), ["3", "8"]),
        (dict(data=-1, fsdp=-1), ["only one"]),
        (dict(data=0), ["positive"]),
    ],
)
def test_mesh_errors_name_the_problem(kwargs, words):
    with pytest.raises(ValueError) as err:
        make_mesh(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_bad_batch_and_names_raise_clear_errors():
    mesh = _mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"6 rows .* multiple of 4"):
        shard_batch(np.ones((6, 2)), mesh)
    with pytest.raises(ValueError, match="'experts' has no rule"):
        logical_to_spec(("experts", "embed"), mesh)
    with pytest.raises(ValueError, match="rank 3"):
        logical_to_spec(("batch", "embed"), mesh, shape=(2, 3, 4))
    with nnx.use_eager_sharding(False):
        bad = nnx.Param(jnp.ones((4, 4)), out_sharding=("embed", "experts"))
    with pytest.raises(ValueError, match="parameter w: .*'experts'"):
        shard_params({"w": bad}, mesh)



def test_the_project_transformer_runs_sharded():
    """The real decoder with its own logical names: logits on a (2,2,2) mesh equal one device's."""
    from iapo_jax.models.config import ModelConfig
    from iapo_jax.models.transformer import Transformer

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         max_position_embeddings=32)
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    tokens = np.random.default_rng(0).integers(0, 64, size=(8, 12)).astype(np.int32)

    @jax.jit
    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    one = make_mesh(devices=jax.devices()[:1])
    reference = logits(shard_params(state, one), shard_batch(tokens, one))
    mesh = _mesh((2, 2, 2))
    sharded = shard_params(state, mesh)
    assert sharded["layers"]["up"].get_value().sharding.spec == P(None, "fsdp", "tensor")
    assert sharded["layers"]["k"].get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    out = logits(sharded, shard_batch(tokens, mesh))
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-6)
