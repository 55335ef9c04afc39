"""Placement for decoding: rows split over one mesh axis, weights and KV cache by the mesh rules.

Rows (prompts x branches) go over `data_axis`. Weights follow `iapo_jax.parallel.mesh`'s logical
rules (vocab / mlp / heads over 'tensor', embed over 'fsdp'), and the KV cache keeps its KV heads
split over 'tensor' (`iapo_jax.decoding.cache_sharding`), so a tensor-parallel mesh never holds a
full copy of either. A mesh may have any subset of the axes ('data' alone is the common case for
decoding); rules naming an absent axis are dropped.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from iapo_jax.models.kv_cache import KVCache
from iapo_jax.decoding.cache_sharding import constrain_cache
from iapo_jax.parallel.mesh import DEFAULT_RULES, shard_params


def rules_for(mesh):
    """DEFAULT_RULES restricted to the axes `mesh` has (a missing axis means size 1)."""
    present = set(mesh.axis_names)

    def keep(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a in present)
        return kept or None

    return tuple((name, keep(axes)) for name, axes in DEFAULT_RULES)


def data_size(mesh, axis: str) -> int:
    if mesh is None:
        return 1
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names}); pass data_axis= "
                         "naming the batch axis.")
    return mesh.shape[axis]


def pad_rows_for(rows: int, mesh, axis: str) -> int:
    """Rows rounded up to a multiple of the data axis, so every device gets the same share."""
    d = data_size(mesh, axis)
    return -(-rows // d) * d


def put_rows(tree, mesh, axis: str):
    """Place every array of `tree` with its leading (row) axis split over `axis`."""
    return jax.device_put(tree, NamedSharding(mesh, P(axis)))


def place_params(state, mesh):
    """An NNX model state placed by the logical rules (replicated on a data-only mesh)."""
    return shard_params(state, mesh, rules_for(mesh))


def constrain_rows(tree, mesh, axis: str):
    """Inside jit: keep row-indexed arrays split over `axis`; a KV cache also over 'tensor' by heads."""
    if mesh is None:
        return tree

    def one(x):
        if isinstance(x, KVCache):
            return constrain_cache(x, mesh, rules_for(mesh), batch_axes=(axis,))
        if getattr(x, "ndim", 0) >= 1 and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axis)))
        return x

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, KVCache))
