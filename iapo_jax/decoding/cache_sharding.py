"""KV-cache placement: rows over the data-parallel axes, KV heads over 'tensor', never replicated
when a mesh axis can split it.

The cache layout ([layers, batch, slots, kv_heads, head_dim] for k and v, [batch, slots] for
`valid`) and its logical names come from `iapo_jax.models.kv_cache`; the rules of
`iapo_jax.parallel.mesh` map them to mesh axes, dropping an axis that does not divide its dimension
(e.g. 3 KV heads on tensor=2 stay whole on every tensor device). The slot axis is not split: every
decode step writes one slot for all rows, which must stay a local update.

  kv_cache_sharding(cache, mesh)   KVCache of NamedShardings (works on abstract caches too)
  shard_cache(cache, mesh)         place a cache (outside jit)
  constrain_cache(cache, mesh)     pin a cache's layout inside jit (e.g. on a decode loop's state)

`batch_axes` overrides which mesh axes split the rows (decoding that splits rows over one 'data'
axis passes ('data',)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iapo_jax.models.kv_cache import KV_AXES, VALID_AXES
from iapo_jax.parallel.mesh import DEFAULT_RULES, Rules, logical_to_sharding


def _rules_with_batch(rules: Rules, batch_axes: Sequence[str] | None) -> Rules:
    if batch_axes is None:
        return rules
    return (("batch", tuple(batch_axes)),) + tuple(r for r in rules if r[0] != "batch")


def kv_cache_sharding(cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                      batch_axes: Sequence[str] | None = None) -> Any:
    """The cache's structure holding a NamedSharding per array (index: replicated)."""
    rules = _rules_with_batch(rules, batch_axes)
    kv = logical_to_sharding(KV_AXES, mesh, rules, cache.k.shape)
    valid = logical_to_sharding(VALID_AXES, mesh, rules, cache.valid.shape)
    return cache.replace(k=kv, v=kv, valid=valid, index=NamedSharding(mesh, PartitionSpec()))


def shard_cache(cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                batch_axes: Sequence[str] | None = None) -> Any:
    """``cache`` placed on ``mesh`` by ``kv_cache_sharding``."""
    return jax.device_put(cache, kv_cache_sharding(cache, mesh, rules, batch_axes))


def constrain_cache(cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    batch_axes: Sequence[str] | None = None) -> Any:
    """Inside jit: ``cache`` with its arrays pinned to ``kv_cache_sharding``."""
    shardings = kv_cache_sharding(cache, mesh, rules, batch_axes)
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, shardings)
