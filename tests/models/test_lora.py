"""Functional LoRA: starts equal to the base, trains only the factors, leaves the base untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax.models import lora


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Param(jax.random.normal(rngs.params(), (3, 8, 2, 4)))  # stacked [L, in, heads, dh]
        self.norm = nnx.Param(jnp.ones((8,)))

    def __call__(self, x):
        for layer in range(3):
            x = jnp.tanh(x @ self.q[layer].reshape(8, 8)) * self.norm[...]
        return x


def test_lora_merge_is_identity_at_init_and_trains_only_factors():
    model = Block(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    factors = lora.init_lora(state, rank=2, key=jax.random.PRNGKey(1))
    assert list(factors) == ["q"] and factors["q"][1].shape == (3, 2, 8)
    x = jnp.ones((4, 8))
    base_out = model(x)
    merged = nnx.merge(graphdef, lora.merge_lora(state, factors, alpha=4.0, rank=2))
    np.testing.assert_allclose(merged(x), base_out, atol=1e-6)

    def loss(f):
        m = nnx.merge(graphdef, lora.merge_lora(state, f, alpha=4.0, rank=2))
        return jnp.sum(m(x) ** 2)

    grads = jax.grad(loss)(factors)
    a_grad, b_grad = grads["q"]
    assert float(jnp.abs(b_grad).sum()) > 0  # B gets a gradient first (A@0 = 0 path)
    np.testing.assert_array_equal(nnx.split(model)[1]["q"][...], state["q"][...])


def test_lora_errors():
    _, state = nnx.split(Block(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="rank must be at least 1"):
        lora.init_lora(state, 0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no parameter matches"):
        lora.init_lora(state, 2, jax.random.PRNGKey(0), targets={"nothing_here": 1})


def _decoder(hidden=64, mlp=256):
    from iapo_jax.models.config import ModelConfig
    from iapo_jax.models.transformer import Transformer

    config = ModelConfig(family="llama", vocab_size=64, hidden_size=hidden, intermediate_size=mlp,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=64)
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)))


def _trained_factors(state, rank=4):
    """Factors with B away from zero, so the delta is not trivially absent."""
    factors = lora.init_lora(state, rank, jax.random.PRNGKey(1))
    keys = jax.random.split(jax.random.PRNGKey(2), len(factors))
    return {n: (a, 0.05 * jax.random.normal(k, b.shape)) for k, (n, (a, b)) in zip(keys, factors.items())}


def test_attached_factors_give_the_merged_models_logits_and_gradients():
    """The factored kernel (W, A, B applied apart) is the same function as W + s A B merged."""
    graphdef, state = _decoder()
    factors = _trained_factors(state)
    tokens = np.random.default_rng(0).integers(0, 64, size=(3, 10)).astype(np.int32)

    def loss(f, attach):
        model = nnx.merge(graphdef, attach(state, f, 8.0, 4))
        return jnp.mean(jax.nn.log_softmax(model(tokens))[..., 0]), model(tokens)

    (l_merged, logits_merged), g_merged = jax.value_and_grad(loss, has_aux=True)(factors, lora.merge_lora)
    (l_attached, logits_attached), g_attached = jax.value_and_grad(loss, has_aux=True)(factors, lora.attach_lora)
    base = nnx.merge(graphdef, state)(tokens)
    assert float(jnp.max(jnp.abs(logits_merged - base))) > 1e-3  # the delta changes the model
    np.testing.assert_allclose(logits_attached, logits_merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_attached, l_merged, rtol=1e-6)
    for name in factors:
        for ga, gm in zip(g_attached[name], g_merged[name]):
            np.testing.assert_allclose(ga, gm, rtol=1e-4, atol=1e-6)


def test_attached_factors_skip_the_frozen_kernels_gradients():
    """Compiled backward FLOPs: merged forms x^T dy for every kernel, attached does not.

    A decoder layer's kernels cost 2NP forward, 2NP for dx and 2NP for dW (P kernel parameters, N
    tokens); dropping dW leaves about two thirds of the merged step.
    """
    graphdef, state = _decoder(hidden=128, mlp=512)
    factors = _trained_factors(state)
    tokens = np.zeros((4, 64), np.int32)

    def flops(attach):
        def loss(f, state):
            return jnp.mean(nnx.merge(graphdef, attach(state, f, 8.0, 4))(tokens))
        compiled = jax.jit(jax.grad(loss)).lower(factors, state).compile()
        analysis = compiled.cost_analysis()
        return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])

    ratio = flops(lora.attach_lora) / flops(lora.merge_lora)
    assert 0.55 < ratio < 0.8, ratio
