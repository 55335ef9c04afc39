"""map_fixed_chunks: every chunk has one shape (one compile), padding rows never come back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.runtime.fixed_chunks import map_fixed_chunks


def test_rows_come_back_in_order_from_one_compiled_shape():
    shapes = []

    @jax.jit
    def fn(a, b):
        shapes.append(a.shape)  # runs at trace time only
        return {"sum": a + b, "first": a[:, 0]}

    a = np.arange(22, dtype=np.float32).reshape(11, 2)
    out = map_fixed_chunks(fn, (a, 2 * a), 4)
    np.testing.assert_array_equal(np.asarray(out["sum"]), 3 * a)
    np.testing.assert_array_equal(np.asarray(out["first"]), a[:, 0])
    assert shapes == [(4, 2)]


def test_no_rows_and_bad_sizes():
    assert map_fixed_chunks(lambda x: x, (np.zeros((0, 3)),), 4) is None
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        map_fixed_chunks(lambda x: x, (jnp.zeros((2, 3)),), 0)
