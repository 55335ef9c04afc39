"""Run a compiled function over many rows in chunks of one fixed size.

Every chunk has the same shape, so the function compiles once: the last chunk is padded with
copies of its first row, and what those rows give back is dropped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def map_fixed_chunks(fn: Callable[..., Any], arrays: Sequence[Any], size: int) -> Any:
    """fn(*chunk) over row chunks of ``size`` of ``arrays`` (all with the same number of rows),
    concatenated on axis 0; fn may return an array or a pytree of arrays with a leading row axis.
    With no rows, fn is not called and None is returned."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {size})")
    arrays = [np.asarray(a) for a in arrays]
    outs = []
    for start in range(0, arrays[0].shape[0], size):
        part = [a[start:start + size] for a in arrays]
        real = part[0].shape[0]
        if real < size:
            part = [np.concatenate([a, np.repeat(a[:1], size - real, 0)]) for a in part]
        out = fn(*[jnp.asarray(a) for a in part])
        outs.append(jax.tree.map(lambda x, real=real: x[:real], out))
    if not outs:
        return None
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
