"""Batch (data-parallel) placement for decoding: rows split over one mesh axis, weights replicated.

Model sharding over further axes belongs to `iapo_jax.parallel`; this module only needs a Mesh with
an axis for the batch.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from iapo_jax.models.kv_cache import KVCache


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


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def constrain_rows(tree, mesh, axis: str):
    """Inside jit: keep row-indexed arrays split over `axis` (a KV cache's rows are its axis 1)."""
    if mesh is None:
        return tree

    def one(x):
        if isinstance(x, KVCache):
            kv = NamedSharding(mesh, P(None, axis))
            return x.replace(k=jax.lax.with_sharding_constraint(x.k, kv),
                             v=jax.lax.with_sharding_constraint(x.v, kv),
                             valid=jax.lax.with_sharding_constraint(x.valid, NamedSharding(mesh, P(axis))))
        if getattr(x, "ndim", 0) >= 1 and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axis)))
        return x

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, KVCache))
