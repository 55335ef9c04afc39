"""Masked grouped-query attention as a pure function, and the masks the transformer feeds it.

Queries arrive grouped as [B, T, kv_heads, groups, head_dim] so that every key/value head serves its
`groups` query heads without copying keys (query head h uses kv head h // groups, as in HF's
`repeat_kv`). Scores, mask and softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a query with no visible key (a left-pad position) gets a uniform softmax instead of NaN.
_MASKED = -1e30


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B,T,Hkv,G,Dh], k/v [B,S,Hkv,Dh], mask [B,T,S] bool (True = may attend) -> [B,T,Hkv,G,Dh]."""
    scores = jnp.einsum("bthgd,bshd->bhgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgts,bshd->bthgd", probs, v)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B,T] real-token mask -> [B,T,T]: query t sees real keys s <= t."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def cache_mask(valid: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """[B,S] valid slots; new queries occupy slots start..start+length-1 -> [B,length,S]."""
    slots = jnp.arange(valid.shape[1])
    query_slot = start + jnp.arange(length)
    return valid[:, None, :] & (slots[None, None, :] <= query_slot[None, :, None])


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among its row's real tokens; pads before the first token get 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
