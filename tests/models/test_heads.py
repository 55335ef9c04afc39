"""Reward and value heads on the shared backbone.

References: the closed form score = <h, w> + b computed here in float64 numpy from the backbone's
hidden states of each sequence alone (no padding); transformers is not involved because the heads
are new parameters. Tolerance 1e-4 (float32 accumulation over 64 features).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax import load_model
from iapo_jax.models.heads import RewardModel, ValueModel, last_token_index
from iapo_jax.models.transformer import LOGICAL_AXES

TOL = 1e-4


@pytest.fixture(scope="module")
def policy(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def _with_random_head(model, seed):
    rng = np.random.default_rng(seed)
    model.head[...] = jnp.asarray(rng.normal(size=model.head[...].shape), jnp.float32)
    model.head_bias[...] = jnp.float32(0.25)
    return model


def _jit_method(model, method):
    """Call model.<method> through a jitted pure function of its (graphdef, state)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return lambda *args: np.asarray(fn(state, *args))


def _hidden_alone(policy, rows, length):
    """Hidden states of each row on its own, unpadded: rows are extended on the right with filler,
    which causal attention keeps from influencing positions < len(row)."""
    ids = np.full((len(rows), length), 5)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    hidden = _jit_method(policy, "hidden")(jnp.asarray(ids, jnp.int32)).astype(np.float64)
    return [hidden[i, :len(row)] for i, row in enumerate(rows)]


def test_last_token_index_from_mask_not_token_values():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(last_token_index(mask)), [4, 2, 4])


def test_reward_score_reads_last_real_token_for_any_padding(policy):
    model = _with_random_head(RewardModel.from_policy(policy, nnx.Rngs(0)), seed=1)
    rows = [np.arange(5, 12), np.arange(40, 44), np.array([2, 2, 7, 2])]  # 2 is also the eos id
    length = 9
    ids = np.full((4, length), 2)  # pad with the eos id on purpose: masks must not look at values
    mask = np.zeros((4, length), int)
    for i, row in enumerate(rows):  # rows 0-2 left padded ...
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    ids[3, :4], mask[3, :4] = rows[1], 1  # ... row 3 right padded
    w, b = np.asarray(model.head[...], np.float64), 0.25
    alone = _hidden_alone(policy, rows + [rows[1]], length)
    expected = [h[-1] @ w + b for h in alone]
    score = _jit_method(model, "score")
    got = score(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=TOL)
    # a different pad value changes nothing
    ids2 = np.where(mask == 1, ids, 99)
    np.testing.assert_allclose(score(jnp.asarray(ids2, jnp.int32), jnp.asarray(mask)), got, atol=1e-6)


def test_value_head_scores_every_prefix_and_cache_agrees(policy):
    model = _with_random_head(ValueModel.from_policy(policy, nnx.Rngs(0)), seed=2)
    row = np.arange(10, 22)
    expected = _hidden_alone(policy, [row], 14)[0] @ np.asarray(model.head[...], np.float64) + 0.25
    ids = np.zeros((2, 14), int)
    mask = np.zeros((2, 14), int)
    ids[0, 2:], mask[0, 2:] = row, 1
    ids[1], mask[1] = np.arange(30, 44), 1
    values = _jit_method(model, "values")(jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    assert values.shape == (2, 14)
    np.testing.assert_allclose(values[0, 2:], expected, atol=TOL)

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, positions, token_mask, cache):
        return nnx.merge(graphdef, state).values_cached(ids, positions, token_mask, cache)

    positions = jnp.maximum(jnp.cumsum(jnp.asarray(mask), axis=1) - 1, 0)
    cache = model.init_cache(2, 16)
    prefix, cache = step(state, jnp.asarray(ids[:, :10], jnp.int32), positions[:, :10],
                         jnp.asarray(mask[:, :10], bool), cache)
    rest = []
    for t in range(10, 14):
        v, cache = step(state, jnp.asarray(ids[:, t:t + 1], jnp.int32), positions[:, t:t + 1],
                        jnp.asarray(mask[:, t:t + 1], bool), cache)
        rest.append(v)
    cached = np.concatenate([np.asarray(prefix)] + [np.asarray(r) for r in rest], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], values[real], atol=1e-5)


def test_from_policy_copies_weights_without_aliasing(policy):
    model = ValueModel.from_policy(policy, nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model.backbone.layers.q[...]), np.asarray(policy.layers.q[...]))
    assert not np.asarray(model.head[...]).any()  # zero-initialised head
    before = np.asarray(policy.layers.q[...]).copy()
    model.backbone.layers.q[...] = model.backbone.layers.q[...] + 1.0
    np.testing.assert_array_equal(np.asarray(policy.layers.q[...]), before)
    small = RewardModel.from_policy(policy, nnx.Rngs(0), head_init_std=0.01)
    assert 0 < np.abs(np.asarray(small.head[...])).max() < 0.1


def test_reward_model_trains_through_a_pure_jitted_loss(policy):
    """Gradients reach head and backbone through (graphdef, state) at the jit boundary."""
    model = RewardModel.from_policy(policy, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.arange(3, 19).reshape(2, 8), jnp.int32)
    mask = jnp.ones((2, 8), bool)

    @jax.jit
    def loss_fn(params):  # Bradley-Terry: row 0 preferred over row 1
        s = nnx.merge(graphdef, params).score(ids, mask)
        return -jax.nn.log_sigmoid(s[0] - s[1])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert np.isclose(float(loss), np.log(2.0), atol=1e-6)  # zero head: equal scores
    assert np.abs(np.asarray(grads["head"][...])).max() > 0
    assert np.abs(np.asarray(grads["backbone"]["layers"]["q"][...])).max() == 0  # zero head blocks it


def test_head_parameters_have_logical_axis_names(policy):
    model = RewardModel.from_policy(policy, nnx.Rngs(0))
    assert model.head.get_metadata()["out_sharding"] == ("embed",)
    assert model.head_bias.get_metadata()["out_sharding"] == ()
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            assert set(var.get_metadata()["out_sharding"]) <= set(LOGICAL_AXES), path
