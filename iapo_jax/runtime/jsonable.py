"""Turn configs, arrays and paths into plain JSON values, so records read back the same everywhere."""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import PurePath
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Recursively convert ``value`` to dicts, lists, str, int, float, bool and None.

    Dataclasses become dicts of their fields, tuples become lists, paths and enums become strings,
    numpy/JAX scalars and 0-d arrays become Python numbers, small arrays become nested lists.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def scalar_or_none(value: Any) -> float | int | bool | None:
    """A Python number for a numeric scalar (Python, numpy or a 0-d/size-1 array), else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        try:
            arr = np.asarray(value)
        except Exception:  # e.g. a non-addressable global array; not a host scalar
            return None
        if arr.size == 1 and arr.dtype.kind in "biuf":
            return arr.reshape(()).item()
    return None


def flatten_scalars(tree: Any, prefix: str = "", limit: int = 10_000) -> dict[str, Any]:
    """Numeric leaves of nested dicts/lists/dataclasses as {"a.b[2]": value}; other leaves are skipped.

    Used to turn whatever a job returns into comparable metrics. At most ``limit`` leaves are kept.
    """
    out: dict[str, float | int | bool] = {}

    def walk(node: Any, key: str) -> None:
        if len(out) >= limit:
            return
        number = scalar_or_none(node)
        if number is not None:
            out[key or "value"] = number
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif hasattr(node, "__array__") and not isinstance(node, (str, bytes)):
            arr = np.asarray(node)
            if arr.dtype.kind in "biuf":
                walk(arr.tolist(), key)

    walk(tree, prefix)
    return out


def same_number(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """True when two recorded numbers agree: equal, both NaN, or within |a-b| <= atol + rtol*|b|."""
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    return abs(a - b) <= atol + rtol * abs(b)
