"""Device mesh with ('data', 'fsdp', 'tensor') axes and logical-axis rules for parameters and arrays.

Model code names each array dimension with a logical name; the rules below map names to mesh axes:

  parameters:  layers, vocab, embed, mlp, q_heads, kv_heads, head_dim, position
  activations: batch, length;  KV cache: batch, cache_seq (+ layers, kv_heads, head_dim)

Data parallelism shards 'batch' over data x fsdp. FSDP also shards parameters along 'embed', and
tensor parallelism shards 'vocab', 'mlp' and the head axes over 'tensor'. Any axis may be size 1.
When a dimension is not divisible by the mesh axes its rule names (e.g. 3 KV heads on tensor=2), or
an earlier dimension already uses that mesh axis, the dimension is replicated instead: the result is
always a valid sharding and the computation stays the same.

Parameters carry their names as flax NNX variable metadata ``out_sharding`` (flax 0.12's name; the
older ``sharding_names``/``sharding`` keywords are remapped to it by flax). Create such models with
``nnx.use_eager_sharding(False)`` (or inside ``mesh_rules(mesh)``) and place them with
``shard_params``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # activations and KV cache
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_seq", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("position", None),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all devices of all processes).

    One size may be -1 to take whatever the others leave. Axes use ``AxisType.Auto``, so sharding
    propagates through ``jax.jit`` as usual. ValueError when the sizes do not fit the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name}={size!r} must be a positive integer or -1")
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(fill)}; fix the others")
    known = math.prod(s for s in sizes.values() if s != -1)
    count = len(devices)
    if fill:
        if count % known:
            raise ValueError(
                f"mesh {_describe(sizes)} cannot fill {count} devices: {known} does not divide "
                f"{count}; choose sizes whose product divides {count}"
            )
        sizes[fill[0]] = count // known
    if math.prod(sizes.values()) != count:
        raise ValueError(
            f"mesh {_describe(sizes)} = {math.prod(sizes.values())} devices, but {count} are "
            f"available; choose sizes whose product is {count} (or -1 for one axis)"
        )
    shape = tuple(int(sizes[a]) for a in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Topology-aware placement can refuse unusual subsets of devices; plain order is valid.
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in sizes.items())


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, axes in rules:
        table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return table


def logical_to_spec(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have logical ``names`` (None = replicated).

    With ``shape``, mesh axes that do not divide their dimension are dropped (that dimension is
    replicated over them). A mesh axis is used at most once; later dimensions lose it.
    """
    table = _rule_table(rules)
    if shape is not None and len(shape) != len(names):
        raise ValueError(
            f"logical names {tuple(names)} have {len(names)} entries but the array has rank "
            f"{len(shape)} (shape {tuple(shape)}); give one name (or None) per dimension"
        )
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no rule; add ({name!r}, mesh_axis_or_None) to the "
                f"rules (known: {', '.join(sorted(table))})"
            )
        axes = []
        for axis in table[name]:
            if axis not in mesh.shape:
                raise ValueError(f"rule for {name!r} names mesh axis {axis!r}, not in {AXES}")
            if axis in used:
                continue
            split = math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]
            if shape is not None and shape[dim] % split:
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_to_sharding(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding on ``mesh`` for logical ``names``; see ``logical_to_spec``."""
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


def _is_variable(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _variable_names(var: Any) -> tuple[str | None, ...] | None:
    names = var.get_metadata().get("out_sharding")
    if names is None:
        return None
    if isinstance(names, PartitionSpec):
        names = tuple(names)
    return tuple(names)


def _leaf_sharding(leaf: Any, mesh: Mesh, rules: Rules, path: str) -> NamedSharding:
    value = leaf.get_value() if _is_variable(leaf) else leaf
    shape = getattr(value, "shape", None)
    names = _variable_names(leaf) if _is_variable(leaf) else None
    if shape is None or names is None:
        return NamedSharding(mesh, PartitionSpec())
    try:
        return logical_to_sharding(names, mesh, rules, shape)
    except ValueError as err:
        raise ValueError(f"parameter {path}: {err}") from None


def _map_leaves(fn, tree: Any) -> Any:
    def visit(path, leaf):
        return fn(leaf, jax.tree_util.keystr(path, simple=True, separator="/"))

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_variable)


def param_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A tree like ``state`` (nnx.State, Variables or arrays) holding each leaf's NamedSharding."""
    def one(leaf, path):
        sharding = _leaf_sharding(leaf, mesh, rules, path)
        return leaf.replace(sharding) if _is_variable(leaf) else sharding

    return _map_leaves(one, state)


def shard_params(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, fresh: bool = False) -> Any:
    """Place every array of ``state`` on ``mesh`` according to its variable's logical names.

    ``state`` is an nnx.State (or any tree of nnx.Variables / arrays); the result has the same
    structure and metadata. Leaves without names are replicated. ``fresh=True`` guarantees new
    buffers, as a step that donates the result needs: a placement may share a device's buffer with
    ``state`` (even with ``may_alias=False``, e.g. one device -> replicated), and donating it would
    delete the caller's array.
    """
    def place(value, sharding):
        out = jax.device_put(value, sharding)
        return jnp.copy(out) if fresh else out

    def one(leaf, path):
        sharding = _leaf_sharding(leaf, mesh, rules, path)
        if _is_variable(leaf):
            return leaf.replace(place(leaf.get_value(), sharding))
        return place(leaf, sharding) if hasattr(leaf, "shape") else leaf

    return _map_leaves(one, state)


def abstract_params(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``state`` with every array replaced by a ShapeDtypeStruct carrying its sharding on ``mesh``.

    Works on concrete states and on ``nnx.eval_shape`` results: the restore target for a checkpoint
    onto this mesh (whatever mesh the checkpoint was saved from).
    """
    def one(leaf, path):
        sharding = _leaf_sharding(leaf, mesh, rules, path)
        value = leaf.get_value() if _is_variable(leaf) else leaf
        if not hasattr(value, "shape"):
            return leaf
        abstract = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
        return leaf.replace(abstract) if _is_variable(leaf) else abstract

    return _map_leaves(one, state)


def batch_sharding(mesh: Mesh, ndim: int = 1, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Sharding of an array whose leading dimension is the batch, split over ``axes``."""
    return NamedSharding(mesh, PartitionSpec(tuple(axes), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> Any:
    """Split the leading dimension of every array in ``batch`` over the data-parallel ``axes``.

    Single process: ``batch`` is the global batch. Several processes: each passes its own slice
    (rows ``process_index * n .. (process_index + 1) * n``) and gets the global array back.
    ValueError when the batch does not divide evenly.
    """
    shards = math.prod(mesh.shape[a] for a in axes)
    processes = jax.process_count()

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError("shard_batch needs arrays with a leading batch dimension, got a scalar")
        rows = x.shape[0] * processes
        if rows % shards:
            per_process = shards // math.gcd(shards, processes)
            hint = f" (per process: a multiple of {per_process})" if processes > 1 else ""
            raise ValueError(
                f"batch of {rows} rows does not divide over {shards} data-parallel shards "
                f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}); use a global batch size "
                f"that is a multiple of {shards}{hint}"
            )
        sharding = batch_sharding(mesh, x.ndim, axes)
        if processes == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(one, batch)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Make ``mesh`` current and the logical rules active for flax (``jax.set_mesh`` + rules).

    Inside, flax creates variables with ``out_sharding`` names directly sharded (eager sharding).
    Unlike ``shard_params``, flax's own rule lookup does not drop indivisible axes.
    """
    from flax import nnx

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield mesh
