"""The machine's roofline (measured read bandwidth and matmul throughput) and the decode-time
limit it implies for a model: each decode step reads every weight and the KV cache once and does
2 FLOPs per weight per row; prefill is compute-bound and shared by the N branches of a prompt."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Machine:
    bandwidth_gbs: float  # sustained read bandwidth, GB/s
    matmul_gflops: dict  # dtype name -> GFLOP/s of a large square matmul through XLA


def _best_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def measure_machine(bandwidth_mb: int | None = None, matmul_n: int | None = None) -> Machine:
    """Read bandwidth from summing a large array; matmul peak from an n x n x n product. Sizes
    default to 512 MB and n = 2048 on a CPU, 4 GB and n = 8192 on an accelerator (HBM and tensor
    cores need more work per call than launch overhead)."""
    accelerator = jax.devices()[0].platform != "cpu"
    bandwidth_mb = bandwidth_mb or (4096 if accelerator else 512)
    matmul_n = matmul_n or (8192 if accelerator else 2048)
    x = jnp.ones((bandwidth_mb * 2**20 // 4,), jnp.float32)
    t = _best_time(jax.jit(jnp.sum), x)
    bandwidth = x.nbytes / t / 1e9
    flops = {}
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((matmul_n, matmul_n), dtype)
        mm = jax.jit(lambda p, q: jnp.matmul(p, q, preferred_element_type=jnp.float32))
        flops[dtype] = 2 * matmul_n**3 / _best_time(mm, a, a, repeats=3) / 1e9
    return Machine(bandwidth_gbs=bandwidth, matmul_gflops=flops)


def count_params(model) -> int:
    from flax import nnx

    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


def decode_roofline_tokens_per_s(config, n_params: int, dtype: str, machine: Machine, *, prompts: int,
                                 branches: int, prompt_len: int, new_tokens: int) -> float:
    """Upper bound on generated tokens/s for `prompts` x `branches` rows of `new_tokens` each."""
    nbytes = 2 if dtype == "bfloat16" else 4
    peak = machine.matmul_gflops[dtype] * 1e9
    bw = machine.bandwidth_gbs * 1e9
    rows = prompts * branches
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * nbytes
    prefill = 2 * n_params * prompts * prompt_len / peak
    total = prefill
    for t in range(new_tokens):
        step_bytes = n_params * nbytes + rows * (prompt_len + t) * kv_per_token
        total += max(step_bytes / bw, 2 * n_params * rows / peak)
    return rows * new_tokens / total
