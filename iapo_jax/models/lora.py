"""Functional LoRA: low-rank deltas on selected weights, applied or merged inside jitted code.

The base parameters stay frozen and untouched; only the (A, B) factors are trained. A target is a
stacked per-layer kernel [layers, *in_axes, *out_axes] (the layout of iapo_jax.models); its delta
is (alpha / r) * A @ B with A [layers, prod(in), r] and B [layers, r, prod(out)], reshaped back.
Only those parameter names and models.low_rank's kernel type tie it to the model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from iapo_jax.models.low_rank import LowRankKernel, factor_shapes

# Decoder kernels and how many of their axes (after 'layers') are input axes.
DEFAULT_TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _target_in_axes(name: str, targets: dict[str, int]) -> int | None:
    leaf = name.rsplit("/", 1)[-1]
    return targets.get(leaf)


def lora_targets(state: nnx.State, targets: dict[str, int] = DEFAULT_TARGETS) -> list[str]:
    """Paths of the kernels that receive a LoRA delta."""
    return [
        _path_str(p) for p, var in nnx.to_flat_state(state)
        if _target_in_axes(_path_str(p), targets) is not None and var[...].ndim >= 3
    ]


def init_lora(state: nnx.State, rank: int, key, targets: dict[str, int] = DEFAULT_TARGETS) -> dict:
    """{path: (A, B)}; B starts at zero so the merged model equals the base exactly."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank}); use rank 0 for full fine-tuning")
    names = set(lora_targets(state, targets))
    if not names:
        raise ValueError(f"no parameter matches the LoRA targets {sorted(targets)}")
    factors = {}
    for path, var in nnx.to_flat_state(state):
        name = _path_str(path)
        if name not in names:
            continue
        a_shape, b_shape = factor_shapes(var[...].shape, _target_in_axes(name, targets), rank)
        key, sub = jax.random.split(key)
        a = jax.random.normal(sub, a_shape, jnp.float32) / jnp.sqrt(a_shape[-2])
        factors[name] = (a, jnp.zeros(b_shape, jnp.float32))
    return factors


def attach_lora(state: nnx.State, factors: dict, alpha: float, rank: int) -> nnx.State:
    """Base state whose factored kernels become LowRankKernels (W, A, B, alpha / r); pure.

    The model computes the same outputs as with merge_lora, and a loss differentiated only with
    respect to the factors never forms the frozen kernels' full gradients: use it in train steps.
    """
    scale = alpha / rank
    out = []
    for path, var in nnx.to_flat_state(state):
        name = _path_str(path)
        if name in factors:
            a, b = factors[name]
            var = var.replace(LowRankKernel(var[...], a, b, scale))
        out.append((path, var))
    return nnx.from_flat_state(out)


def merge_lora(state: nnx.State, factors: dict, alpha: float, rank: int) -> nnx.State:
    """Base state with W + (alpha / r) A @ B on every factored kernel (a new state; pure).

    Plain arrays again, for decoding and saving.
    """
    attached = nnx.to_flat_state(attach_lora(state, factors, alpha, rank))
    return nnx.from_flat_state([
        (path, var.replace(var[...].merged()) if isinstance(var[...], LowRankKernel) else var)
        for path, var in attached
    ])
