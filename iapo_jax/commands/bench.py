"""``iapo bench decode``: decoding throughput of this project against transformers' generate.
``iapo bench train``: where one CTRL step's time goes (rollout, reference log-probs, reward,
calibration, update), for full fine-tuning and LoRA, and how many steps fit in an hour.

    iapo bench decode                       # SmolLM2-135M-Instruct and a tiny model, f32 and bf16
    iapo bench decode --json runs/bench_decode.json --markdown bench.md
    iapo bench decode --models tiny --dtypes float32 --repeats 1      # a quick look
    iapo bench decode --models llama-1b-random --modes plain bon4 bon16 bon64   # GPU: nothing to download
    iapo bench train --markdown train.md     # SmolLM2, 4 prompts x 8 samples x 24 tokens, full and LoRA

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

from iapo_jax.commands import JobSpec
from iapo_jax.commands.job_inputs import check_output_file


# PyTorch's OpenMP threads spin while waiting by default; on a CPU shared with other processes that
# made transformers' generate up to ~25x slower in our measurements. Passive waiting is the fair
# baseline (it changes little on an idle machine). OpenMP reads this once, before torch loads.
OMP_POLICY = "PASSIVE"
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_POLICY)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Decoding throughput against transformers' generate (plain, best-of-N, blockwise CD), or the
    time of one CTRL step by stage."""

    target: tyro.conf.Positional[Literal["decode", "train"]] = "decode"
    """What to benchmark: `decode` (throughput) or `train` (one CTRL step, by stage)."""
    json: Path | None = None
    """Write the records (a JSON list) here."""
    markdown: Path | None = None
    """Write the tables (markdown, with the machine named) here."""
    models: tuple[str, ...] | None = None
    """Model sources, or architectures made here with random weights (no download; written by
    transformers for the run): tiny, smollm2-135m-random, llama-1b-random, llama-8b-random.
    Default: smollm2-135m-instruct and tiny for decode; smollm2-135m-instruct for train (which
    needs a tokenizer, so no random-weight model)."""
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
    """Also time the PyTorch baseline in the same run: transformers' generate (decode) or TRL's
    RLOOTrainer (train; needs the `bench` extra)."""
    roofline: bool = True
    """Measure the machine's bandwidth and matmul peak and report roofline fractions."""
    setups: tuple[Literal["full", "lora"], ...] = ("full", "lora")
    """train: full fine-tuning and/or LoRA (rank 8)."""
    prompts_per_step: int = 4
    """train: prompts per CTRL step."""
    samples_per_prompt: int = 8
    """train: rollouts per prompt."""
    rollout_tokens: int = 24
    """train: new tokens per rollout (at most; rollouts stop at EOS)."""
    pool_size: int = 16
    """train: reference samples per prompt for the calibration."""
    train_reward: str = "vader"
    """train: the packaged reward the rollouts are scored with."""

    def model_sources(self) -> tuple[str, ...]:
        if self.models is not None:
            return self.models
        return ("smollm2-135m-instruct",) if self.target == "train" else ("smollm2-135m-instruct", "tiny")


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
    per_dtype = len(cfg.setups if cfg.target == "train" else cfg.modes)
    bar = progress(total=len(cfg.models) * len(cfg.dtypes) * per_dtype, desc="bench",
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
    from iapo_jax.bench.train_step import run_train_benchmark, train_table

    check_output_file(cfg.json, "--json")  # before the benchmark, so its results are not lost
    check_output_file(cfg.markdown, "--markdown")
    for name in ("num_prompts", "max_new_tokens", "repeats", "blockwise_k", "block_size",
                 "prompts_per_step", "samples_per_prompt", "rollout_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}.")
    cfg = dataclasses.replace(cfg, models=cfg.model_sources())
    if cfg.target == "train":
        check_train_inputs(cfg)
    machine = measure_machine() if cfg.roofline else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    line = f"Machine: {machine_name()}"
    line += f" (load average {load[0]:.1f} at the start)." if load else "."
    if machine is not None:
        line += (f" Measured read bandwidth {machine.bandwidth_gbs:.1f} GB/s; matmul "
                 f"{machine.matmul_gflops['float32']:.0f} GFLOP/s float32, "
                 f"{machine.matmul_gflops['bfloat16']:.0f} GFLOP/s bfloat16 (XLA).")
    with _measurement_progress(cfg) as log:
        if cfg.target == "train":
            records = run_train_benchmark(cfg, log=log)
        else:
            records = run_decode_benchmark(cfg, machine, log=log)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for r in records:
        r["machine"] = machine_name()
        r["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
        r["load_average_1min_at_end"] = load
    text = train_table(records, line) if cfg.target == "train" else tables(records, line)
    print(text)
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(records, indent=1))
    if cfg.markdown is not None:
        cfg.markdown.parent.mkdir(parents=True, exist_ok=True)
        cfg.markdown.write_text(text + "\n")
    if cfg.target == "train":
        return {f"{r['model']}/{r['dtype']}/{r['setup']}/{key}": r[key] for r in records
                for key in ("step_s", "rollout_s", "update_s")}
    return {f"{r['model']}/{r['dtype']}/{r['mode']}/{key}": r[key] for r in records
            for key in ("tokens_per_s", "ratio") if r[key] is not None}


def check_train_inputs(cfg: BenchConfig) -> None:
    """`bench train` needs text: real models with tokenizers, and a registered reward."""
    from iapo_jax.bench.models import is_random_model
    from iapo_jax.rewards.registry import available_rewards

    random = [m for m in cfg.models if is_random_model(m)]
    if random:
        raise ValueError(f"bench train scores rollouts as text, so it needs a model with a tokenizer; "
                         f"{random[0]} has random weights and none (use smollm2-135m-instruct)")
    if cfg.train_reward not in available_rewards():
        raise ValueError(f"unknown --train-reward {cfg.train_reward!r}; choose from {available_rewards()}")
    if cfg.pool_size < 2:
        raise ValueError(f"--pool-size must be at least 2 (calibration ranks against it), got {cfg.pool_size}")


# Every number is a timing, of one process against transformers: no multi-process flags.
JOB = JobSpec(config=BenchConfig, run=run, reproduce_ignore=("*",), single_process=True)
