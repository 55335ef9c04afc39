"""Preallocated key/value cache shared by every decoding path.

Layout: k and v are [layers, batch, slots, kv_heads, head_dim]. `valid` marks which slots hold a
real token for each row (left padding and finished rows leave holes), so attention masks come from
lengths and slot validity, never from token values. `index` is the next slot to write; every row
writes the same slot, which is what makes the cache a dense, jit-friendly array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Logical axis names of the cache arrays (mapped to mesh axes by iapo_jax.parallel).
KV_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
VALID_AXES = ("batch", "cache_seq")


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, Hkv, Dh]
    v: jax.Array  # [L, B, S, Hkv, Dh]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # int32 scalar: next slot to write

    @classmethod
    def zeros(cls, num_layers, batch, slots, kv_heads, head_dim, dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, slots, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, slots), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def repeat(self, n: int) -> "KVCache":
        """Broadcast each row to n consecutive rows (row b -> rows b*n .. b*n+n-1)."""
        rep = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
        return self.replace(k=rep(self.k, 1), v=rep(self.v, 1), valid=rep(self.valid, 0))

    def take(self, rows: jax.Array) -> "KVCache":
        """Gather rows (e.g. the winning branch of each prompt after a selection)."""
        return self.replace(
            k=jnp.take(self.k, rows, axis=1),
            v=jnp.take(self.v, rows, axis=1),
            valid=jnp.take(self.valid, rows, axis=0),
        )
