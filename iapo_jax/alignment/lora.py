"""Functional LoRA: low-rank deltas on selected weights, merged inside the jitted step.

The base parameters stay frozen and untouched; only the (A, B) factors are trained. Merging is
W + (alpha / r) * A @ B on the last two axes, so it works for stacked per-layer weights
[layers, in, out] as well as plain matrices, and needs nothing from the model definition.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

# Attention and MLP projections of Llama- and GPT-2-style blocks, as named in iapo_jax.models.
DEFAULT_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|attn_out|fc_in|fc_out)"


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def lora_targets(state: nnx.State, pattern: str = DEFAULT_TARGETS) -> list[str]:
    """Paths of the weight matrices that receive a LoRA delta."""
    flat = nnx.to_flat_state(state)
    rx = re.compile(pattern)
    return [
        _path_str(path)
        for path, var in flat
        if rx.search(_path_str(path)) and var[...].ndim >= 2
        and not _path_str(path).endswith("bias")
    ]


def init_lora(state: nnx.State, rank: int, key, pattern: str = DEFAULT_TARGETS) -> dict:
    """{path: (A [..., in, r], B [..., r, out])}; B starts at zero so the merged model equals the base."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank}); use rank 0 for full fine-tuning")
    targets = set(lora_targets(state, pattern))
    if not targets:
        raise ValueError(f"no parameter path matches the LoRA target pattern {pattern!r}")
    factors = {}
    for path, var in nnx.to_flat_state(state):
        name = _path_str(path)
        if name not in targets:
            continue
        w = var[...]
        key, sub = jax.random.split(key)
        *lead, d_in, d_out = w.shape
        a = jax.random.normal(sub, (*lead, d_in, rank), jnp.float32) / jnp.sqrt(d_in)
        factors[name] = (a, jnp.zeros((*lead, rank, d_out), jnp.float32))
    return factors


def merge_lora(state: nnx.State, factors: dict, alpha: float, rank: int) -> nnx.State:
    """Base state with W + (alpha / r) A @ B on every factored path (a new state; pure)."""
    scale = alpha / rank
    flat = nnx.to_flat_state(state)
    merged = []
    for path, var in flat:
        name = _path_str(path)
        if name in factors:
            a, b = factors[name]
            w = var[...]
            var = var.replace(w + (scale * (a @ b)).astype(w.dtype))
        merged.append((path, var))
    return nnx.from_flat_state(merged)
