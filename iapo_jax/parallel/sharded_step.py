"""Run a train step sharded under a mesh: parameters and optimizer state by their logical names,
the batch split over the data-parallel axes.

Every trainer here has a step of one shape,

    step(trainable, frozen, opt_state, batch, *scalars) -> (trainable, opt_state, metrics),

so one wrapper serves the reward model, the prefix scorer and CTRL:

    trainable, frozen, opt_state = shard_train_state(trainable, frozen, opt_state, mesh)
    step = sharded_train_step(step, mesh)            # instead of jax.jit(step, donate_argnums=(0, 2))
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, *scalars)

Optimizer states built by optax from an nnx.State keep each parameter's Variable (and so its
logical names) in their moment trees, so they are sharded exactly like the parameters; leaves
without names (step counters, LoRA factors) are replicated. Inside the step, sharding constraints
and output shardings pin the state's layout, so outputs come back sharded like inputs and donation
reuses the buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from iapo_jax.parallel.mesh import (
    BATCH_AXES,
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    param_shardings,
    shard_batch,
    shard_params,
)


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch-leading array of rank ``ndim``: rows over data x fsdp."""
    return batch_sharding(mesh, ndim, BATCH_AXES)


def data_parallel_size(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> int:
    """How many ways the batch is split: global batch sizes must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in axes)


def check_batch_divides(rows: int, mesh: Mesh, what: str = "batch", axes: Sequence[str] = BATCH_AXES) -> None:
    """ValueError naming the fix when ``rows`` does not split evenly over the data-parallel axes."""
    shards = data_parallel_size(mesh, axes)
    if rows % shards:
        layout = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(
            f"{what} of {rows} rows does not divide over {shards} data-parallel shards ({layout}); "
            f"use a multiple of {shards} rows or a mesh with fewer data/fsdp devices"
        )


def shard_train_state(trainable: Any, frozen: Any, opt_state: Any, mesh: Mesh,
                      rules: Rules = DEFAULT_RULES) -> tuple[Any, Any, Any]:
    """Place (trainable, frozen, opt_state) on ``mesh``; any of them may be None.

    The trainable and optimizer trees get fresh buffers (the step donates them, which must not
    delete the arrays they came from); the frozen tree may share the caller's buffers.
    """
    return (shard_params(trainable, mesh, rules, fresh=True), shard_params(frozen, mesh, rules),
            shard_params(opt_state, mesh, rules, fresh=True))


def _is_variable(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def constrain_params(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Inside jit: pin every array of ``tree`` to its logical-name sharding (unnamed: replicated)."""
    shardings = param_shardings(tree, mesh, rules)

    def one(leaf, sharding):
        if _is_variable(leaf):
            return leaf.replace(jax.lax.with_sharding_constraint(leaf.get_value(), sharding.get_value()))
        if not hasattr(leaf, "shape") or _is_key(leaf):
            return leaf
        return jax.lax.with_sharding_constraint(leaf, sharding)

    return jax.tree.map(one, tree, shardings, is_leaf=_is_variable)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def constrain_batch(tree: Any, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> Any:
    """Inside jit: keep every batch-leading array of ``tree`` split over ``axes``."""
    shards = data_parallel_size(mesh, axes)

    def one(x):
        if getattr(x, "ndim", 0) < 1 or _is_key(x) or x.shape[0] % shards:
            return x
        spec = PartitionSpec(tuple(axes), *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)


def sharded_train_step(step: Callable, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                       donate: bool = True) -> Callable:
    """Compile ``step`` (not yet jitted) to run sharded under ``mesh``.

    The returned function has the step's signature. It splits the batch over data x fsdp before
    the call (ValueError when the rows do not divide) and expects the state placed with
    ``shard_train_state``; trainable and optimizer state are donated, as in the unsharded steps.
    Outputs get exactly the shardings ``shard_train_state`` gives, so step k's outputs are step
    k+1's inputs without a retrace (``programs`` holds one jitted function per state structure).
    """

    def constrained(trainable, frozen, opt_state, batch, *scalars):
        frozen = constrain_params(frozen, mesh, rules)
        batch = constrain_batch(batch, mesh)
        return step(trainable, frozen, opt_state, batch, *scalars)

    programs: dict[Any, Callable] = {}

    def call(trainable, frozen, opt_state, batch, *scalars):
        batch = shard_batch(batch, mesh)
        key = jax.tree.structure((trainable, opt_state), is_leaf=_is_variable)
        if key not in programs:
            out = (param_shardings(trainable, mesh, rules), param_shardings(opt_state, mesh, rules),
                   NamedSharding(mesh, PartitionSpec()))
            programs[key] = jax.jit(constrained, out_shardings=out,
                                    donate_argnums=(0, 2) if donate else ())
        return programs[key](trainable, frozen, opt_state, batch, *scalars)

    call.programs = programs
    call.mesh = mesh
    return call


def compile_train_step(step: Callable, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Callable:
    """``step`` jitted with trainable and optimizer state donated; sharded under ``mesh`` if given."""
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 2))
    return sharded_train_step(step, mesh, rules)
