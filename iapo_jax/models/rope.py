"""Rotary position embeddings in the `rotate_half` layout that HF Llama checkpoints use.

The first and second halves of each head's features form the rotated pairs (feature i with i + d/2).
Frequencies follow the config: plain theta, 'linear' scaling (positions divided by a factor), or
'llama3' scaling (long wavelengths divided by the factor, a smooth ramp in between).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from iapo_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 angular frequencies, computed once on the host."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind, scaling = config.rope_type, config.rope_scaling or {}
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        inv = _llama3_scaled(inv, scaling)
    return inv.astype(np.float32)


def _llama3_scaled(inv: np.ndarray, s: dict) -> np.ndarray:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    # Long wavelengths (beyond old_len / low) are slowed by `factor`; short ones (below
    # old_len / high) are kept; in between, interpolate linearly in old_len / wavelen.
    ramp = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - ramp) * inv / factor + ramp * inv


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., head_dim] float32 for integer positions [...]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, ..., head_dim] by per-token angles cos/sin [B, T, head_dim], in float32."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
