"""``iapo bench decode``: decoding throughput of this project against transformers' generate.

    iapo bench decode                       # SmolLM2-135M-Instruct and a tiny model, f32 and bf16
    iapo bench decode --json runs/bench_decode.json --markdown bench.md
    iapo bench decode --models tiny --dtypes float32 --repeats 1      # a quick look
    iapo bench decode --models llama-1b-random --modes plain bon4 bon16 bon64   # GPU: nothing to download

Prints one table per dtype: generated tokens/s of this project and of transformers (same weights,
dtype, prompts and lengths, num_return_sequences = N, in the same run), their ratio, compile time,
peak memory, and the fraction of the machine's roofline (measured bandwidth and matmul peak).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import Literal

import tyro

REPRODUCE_IGNORE = ("*",)  # every number here is a timing
SINGLE_PROCESS = True  # timings of one process against transformers; no multi-process flags

# PyTorch's OpenMP threads spin while waiting by default; on a CPU shared with other processes that
# made transformers' generate up to ~25x slower in our measurements. Passive waiting is the fair
# baseline (it changes little on an idle machine). OpenMP reads this once, before torch loads.
OMP_POLICY = "PASSIVE"
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_POLICY)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Decoding throughput against transformers' generate (plain, best-of-N, blockwise CD)."""

    target: tyro.conf.Positional[Literal["decode"]] = "decode"
    """What to benchmark (only `decode`)."""
    json: Path | None = None
    """Write the records (a JSON list) here."""
    markdown: Path | None = None
    """Write the tables (markdown, with the machine named) here."""
    models: tuple[str, ...] = ("smollm2-135m-instruct", "tiny")
    """Model sources, or architectures made here with random weights (no download; written by
    transformers for the run): tiny, smollm2-135m-random, llama-1b-random, llama-8b-random."""
    dtypes: tuple[Literal["float32", "bfloat16"], ...] = ("float32", "bfloat16")
    """Dtypes; each side runs in the same dtype (weights and compute; f32 accumulation)."""
    modes: tuple[Literal["plain", "bon4", "bon16", "bon64", "blockwise"], ...] = (
        "plain", "bon4", "bon16", "blockwise")
    """plain sampling, best-of-4 / 16 / 64, blockwise CD (K = --blockwise-k, M = --block-size).
    With two or more of plain and bon*, an N-scaling table is printed too."""
    num_prompts: int = 4
    """Prompts per call (fixed chat questions)."""
    max_new_tokens: int = 64
    """Tokens generated per row (no early stop)."""
    repeats: int = 3
    """Timed runs after one warm-up; tokens/s uses their median."""
    blockwise_k: int = 4
    """Blockwise CD: candidates per block (K)."""
    block_size: int = 8
    """Blockwise CD: tokens per block (M)."""
    baseline: bool = True
    """Also time transformers' generate (PyTorch) in the same run."""
    roofline: bool = True
    """Measure the machine's bandwidth and matmul peak and report roofline fractions."""


MATRIX_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides the fast paths


def cpu_flags() -> tuple[str, ...]:
    """Which of MATRIX_FLAGS this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return tuple(f for f in MATRIX_FLAGS if f in have)
    except OSError:
        pass
    return ()


def machine_name() -> str:
    """CPU model, core count and matrix-unit flags (from /proc/cpuinfo), or the accelerator's name."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} ({jax.device_count()} x {dev.platform})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    missing = [f for f in MATRIX_FLAGS if f not in flags]
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none'}"
            + (f" (no {' '.join(missing)})" if missing else ""))


@contextlib.contextmanager
def _measurement_progress(cfg: BenchConfig):
    """The benchmark's "[bench] model dtype mode" notes as progress over its measurements: a bar
    in a terminal or notebook, the notes themselves on stderr in a log, nothing with --quiet."""
    from iapo_jax.runtime.progress import progress, progress_mode

    mode = progress_mode()
    bar = progress(total=len(cfg.models) * len(cfg.dtypes) * len(cfg.modes), desc="bench",
                   unit="measurement")
    started = [0]

    def log(message: str) -> None:
        if " rows x " in message:  # a measurement starts (its result is the next note)
            if started[0]:
                bar.update(1)
            started[0] += 1
        if mode == "bar" and " rows x " in message:
            bar.set_description(message.removeprefix("[bench] ").split(":")[0])
        elif mode == "bar":
            bar.write(message, file=sys.stderr)  # a result: printed above the bar
        elif mode == "lines":
            print(message, file=sys.stderr, flush=True)

    try:
        yield log
        if started[0]:
            bar.update(1)
    finally:
        bar.close()


def run(cfg: BenchConfig) -> dict:
    from iapo_jax.bench.decode import run_decode_benchmark
    from iapo_jax.bench.report import tables
    from iapo_jax.bench.roofline import measure_machine
    from iapo_jax.commands.job_inputs import check_output_file

    check_output_file(cfg.json, "--json")  # before the benchmark, so its results are not lost
    check_output_file(cfg.markdown, "--markdown")
    for name in ("num_prompts", "max_new_tokens", "repeats", "blockwise_k", "block_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    machine = measure_machine() if cfg.roofline else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    line = f"Machine: {machine_name()}"
    line += f" (load average {load[0]:.1f} at the start)." if load else "."
    if machine is not None:
        line += (f" Measured read bandwidth {machine.bandwidth_gbs:.1f} GB/s; matmul "
                 f"{machine.matmul_gflops['float32']:.0f} GFLOP/s float32, "
                 f"{machine.matmul_gflops['bfloat16']:.0f} GFLOP/s bfloat16 (XLA).")
    with _measurement_progress(cfg) as log:
        records = run_decode_benchmark(cfg, machine, log=log)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in records:
        r["machine"] = machine_name()
        r["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
        r["load_average_1min_at_end"] = load
    text = tables(records, line)
    print(text)
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(records, indent=1))
    if cfg.markdown is not None:
        cfg.markdown.parent.mkdir(parents=True, exist_ok=True)
        cfg.markdown.write_text(text + "\n")
    return {f"{r['model']}/{r['dtype']}/{r['mode']}/{key}": r[key] for r in records
            for key in ("tokens_per_s", "ratio") if r[key] is not None}
