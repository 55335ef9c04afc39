"""Functional LoRA: starts equal to the base, trains only the factors, leaves the base untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax.alignment import lora


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
