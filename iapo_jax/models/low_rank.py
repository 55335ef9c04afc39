"""A frozen kernel with a trainable low-rank delta that is applied, not added in.

x @ (W + s A B) costs the same forward as x @ W' for a merged W', but its backward differs: with W
merged, autodiff forms the full gradient x^T dy of every kernel and only then projects it onto the
factors. Kept apart, W is a constant of the loss, so only dx flows through it and the factors'
gradients are rank-r products; a LoRA update then costs about two thirds of a full one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LowRankKernel:
    """W [*lead, *in, *out] with A [*lead, prod(in), r] and B [*lead, r, prod(out)]; y = xW + s(xA)B.

    A pytree, so a scan over the stacked 'layers' axis slices all three together. It stands where a
    kernel array stands in a model state (models.transformer applies it in its dense layers).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)

    def __getitem__(self, index):
        # nnx reads a parameter's value as var[...]; the kernel is its own full view.
        if index is not Ellipsis:
            raise TypeError("a LowRankKernel is read whole (var[...]); merge it to index into it")
        return self

    def astype(self, dtype) -> "LowRankKernel":
        return self.replace(base=self.base.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))

    def merged(self) -> jax.Array:
        """W + s A B as one array of W's shape and dtype."""
        delta = self.scale * jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return self.base + delta.reshape(self.base.shape).astype(self.base.dtype)


def dense(x: jax.Array, kernel, bias=None) -> jax.Array:
    """x [N, in] @ kernel [in, ...] (flattened), float32 accumulation, result in x's dtype.

    kernel is an array or one layer's LowRankKernel (A [in, r], B [r, out]).
    """
    low_rank = isinstance(kernel, LowRankKernel)
    base = kernel.base if low_rank else kernel
    y = jnp.matmul(x, base.reshape(x.shape[-1], -1), preferred_element_type=jnp.float32)
    if low_rank:
        low = jnp.matmul(x, kernel.a.astype(x.dtype), preferred_element_type=jnp.float32)
        y = y + kernel.scale * jnp.matmul(low.astype(x.dtype), kernel.b.astype(x.dtype),
                                          preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.reshape(-1)
    return y.astype(x.dtype)


def factor_shapes(shape: tuple[int, ...], in_axes: int, rank: int):
    """(A shape, B shape) for a stacked kernel [layers, *in (in_axes of them), *out]."""
    lead, rest = shape[:1], shape[1:]
    d_in, d_out = math.prod(rest[:in_axes]), math.prod(rest[in_axes:])
    return (*lead, d_in, rank), (*lead, rank, d_out)
