"""The JAX transformer against transformers' PyTorch models on tiny random checkpoints.

References nobody here wrote: transformers' PyTorch logits (float32). Tolerances: max abs diff
<= 1e-4 in float32 (observed about 2e-7); bfloat16 parameters and compute within 0.02 max abs and
0.003 mean abs of the float32 logits (observed 0.004 / 0.0007; logits here are of magnitude about 1).
Every test reuses one compiled function per model and shape: XLA:CPU compilation dominates here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from iapo_jax import load_model
from iapo_jax.models.transformer import LOGICAL_AXES

F32_TOL = 1e-4
BATCH, LENGTH = 3, 17


@functools.lru_cache(maxsize=4)
def _torch_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _torch_logits(model_dir, ids, **kwargs):
    with torch.no_grad():
        kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
        return _torch_model(model_dir)(torch.tensor(ids), **kwargs).logits.numpy()


def _random_ids(seed, batch=BATCH, length=LENGTH, vocab=256):
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length)).astype(np.int64)


class Compiled:
    """A model split into (graphdef, state) at the jit boundary, with its jitted entry points."""

    def __init__(self, model):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        g = self.graphdef
        self._logits = jax.jit(lambda s, ids, mask, pos: nnx.merge(g, s)(ids, mask, pos))
        self._step = jax.jit(lambda s, ids, pos, tmask, cache:
                             nnx.merge(g, s).forward_cached(ids, pos, tmask, cache))

    def logits(self, ids, mask=None, positions=None):
        # Always pass mask and positions (the defaults the model would use), so one compiled
        # program serves every call of the same shape.
        mask = np.ones(np.shape(ids), bool) if mask is None else np.asarray(mask, bool)
        if positions is None:
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return np.asarray(self._logits(self.state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                       jnp.asarray(positions, jnp.int32)))

    def step(self, ids, positions, token_mask, cache):
        return self._step(self.state, ids, positions, token_mask, cache)


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def compiled(checkpoint):
    return Compiled(load_model(checkpoint))


def test_logits_match_transformers_unpadded(checkpoint, compiled):
    ids = _random_ids(0)
    ref = _torch_logits(checkpoint, ids)
    got = compiled.logits(ids)
    assert got.shape == ref.shape == (BATCH, LENGTH, 256) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= F32_TOL


def test_left_padded_rows_match_each_row_alone(checkpoint, compiled):
    """Each left-padded row equals transformers' logits for that row without padding."""
    rows = [_random_ids(10 + i, 1, n)[0] for i, n in enumerate([LENGTH, 9, 4])]
    ids = np.zeros((BATCH, LENGTH), np.int64)
    mask = np.zeros((BATCH, LENGTH), np.int64)
    for i, row in enumerate(rows):
        ids[i, LENGTH - len(row):], mask[i, LENGTH - len(row):] = row, 1
    got = compiled.logits(ids, jnp.asarray(mask))
    for i, row in enumerate(rows):
        ref = _torch_logits(checkpoint, row[None])[0]
        assert np.abs(got[i, LENGTH - len(row):] - ref).max() <= F32_TOL
    # transformers with the same padded batch and mask agrees too (its own masking, our positions).
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _torch_logits(checkpoint, ids, attention_mask=mask, position_ids=positions)
    assert np.abs(got - ref)[mask.astype(bool)].max() <= F32_TOL


def test_hidden_then_head_equals_call(compiled):
    """hidden() + logits_from_hidden() on chosen positions == __call__; explicit positions agree."""
    model, g = compiled.model, compiled.graphdef
    ids = jnp.asarray(_random_ids(3), jnp.int32)
    mask = jnp.asarray(np.array([[0, 0] + [1] * (LENGTH - 2), [1] * LENGTH, [0] * 7 + [1] * 10]))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

    @jax.jit
    def last_three(state, ids, mask, positions):
        m = nnx.merge(g, state)
        return m.logits_from_hidden(m.hidden(ids, mask, positions)[:, -3:])

    full = compiled.logits(ids, mask)
    tail = np.asarray(last_three(compiled.state, ids, mask, positions))
    assert tail.shape == (BATCH, 3, model.config.vocab_size)
    assert np.abs(full[:, -3:] - tail).max() <= 1e-5


@pytest.mark.parametrize("block", [1, 3])
def test_cache_equals_no_cache_with_left_padding(compiled, block):
    """Prefill 8 tokens, then decode `block` tokens per call; logits equal the uncached pass."""
    ids = jnp.asarray(_random_ids(4), jnp.int32)
    mask = np.array([[0] * 5 + [1] * 12, [1] * LENGTH, [0] * 2 + [1] * 15])
    expected = compiled.logits(ids, jnp.asarray(mask))
    positions = jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    cache = compiled.model.init_cache(BATCH, 20)
    hidden, start = [], 0
    for stop in [8] + list(range(8 + block, LENGTH + 1, block)):
        h, cache = compiled.step(ids[:, start:stop], positions[:, start:stop],
                                 jnp.asarray(mask[:, start:stop], bool), cache)
        hidden.append(h)
        start = stop
    assert start == LENGTH
    got = np.asarray(compiled.model.logits_from_hidden(jnp.concatenate(hidden, axis=1)))
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-5
    assert int(cache.index) == LENGTH
    assert np.array_equal(np.asarray(cache.valid[:, :LENGTH]), real)
    assert not np.asarray(cache.valid[:, LENGTH:]).any()


def test_cache_overflow_is_rejected_before_compute(compiled):
    cache = compiled.model.init_cache(1, 4)
    with pytest.raises(ValueError, match="slots"):
        compiled.model.forward_cached(jnp.ones((1, 5), jnp.int32), jnp.arange(5)[None],
                                      jnp.ones((1, 5), bool), cache)


def test_bfloat16_close_to_float32(checkpoint, compiled):
    ids = _random_ids(5)
    f32 = compiled.logits(ids)
    bf16_model = load_model(checkpoint, dtype="bfloat16")
    assert bf16_model.layers.q[...].dtype == jnp.bfloat16
    bf16 = Compiled(bf16_model).logits(ids)
    assert bf16.dtype == np.float32  # logits stay float32
    diff = np.abs(bf16 - f32)
    assert diff.max() <= 0.02 and diff.mean() <= 0.003, (diff.max(), diff.mean())


def test_every_parameter_has_logical_axis_names(compiled):
    for path, var in nnx.iter_graph(compiled.model):
        if isinstance(var, nnx.Variable):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var[...].ndim, path
            assert set(names) <= set(LOGICAL_AXES), (path, names)
    assert compiled.model.layers.q.get_metadata()["out_sharding"][0] == "layers"


@pytest.mark.parametrize("variant", ["qwen2_biases", "llama3_rope", "linear_rope_tied"])
def test_llama_family_variants_match_transformers(tmp_path, variant):
    """QKV biases (Qwen2), llama3 and linear RoPE scaling, tied head; positions up to 272."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(1)
    if variant == "qwen2_biases":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False))
        with torch.no_grad():  # transformers initialises biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif variant == "llama3_rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 5e5}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    else:
        rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True))
    model.eval().save_pretrained(tmp_path)
    ids = _random_ids(6, 2, 40, vocab=128)
    positions = np.tile(np.arange(40) * 7, (2, 1))
    with torch.no_grad():
        ref = model(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
    ours = load_model(tmp_path)
    if variant != "qwen2_biases":
        assert ours.config.rope_type == variant.split("_")[0]
    got = Compiled(ours).logits(ids, positions=jnp.asarray(positions))
    assert np.abs(got - ref).max() <= F32_TOL
