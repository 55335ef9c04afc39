"""The decoding benchmark: this project's compiled sampler against transformers' `generate`.

For each model and dtype, and each mode (plain sampling, best-of-N, blockwise CD), both sides
generate exactly `new_tokens` tokens for every row from the same prompts and weights (no early
stop). Tokens/s = generated (sampled) tokens / median wall time of `repeats` runs after one warm-up;
compile time = what JAX reports spending on tracing, lowering and compiling during the warm-up.
Best-of-N and blockwise CD score with a cheap JAX scorer on token ids, so the numbers measure the
decoding machinery, not a reward model.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from iapo_jax.bench.hf_baseline import hf_generate, load_hf_model
from iapo_jax.bench.memory import PeakMemory
from iapo_jax.bench.models import RANDOM_MODELS, is_random_model, make_random_checkpoint
from iapo_jax.bench.roofline import Machine, count_params, decode_roofline_tokens_per_s

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a rainbow forms.",
    "Give me three tips for learning to cook.",
)
MODES = {"plain": ("plain", 1), "bon4": ("best_of_n", 4), "bon16": ("best_of_n", 16), "bon64": ("best_of_n", 64),
         "blockwise": ("blockwise", None)}


def _cheap_scorer():
    from iapo_jax.decoding.scorers import PrefixFn

    return PrefixFn(lambda ids, mask: jnp.sum(jnp.where(mask, jnp.cos(ids * 0.01), 0.0), -1), "token_cos")


def benchmark_prompts(source, num_prompts: int, vocab_size: int | None = None) -> list[list[int]]:
    """Chat-templated questions for real models; for random-weight models (no tokenizer), fixed
    random ids of similar length (37-40 tokens)."""
    if is_random_model(source):
        rng = np.random.default_rng(0)
        return [rng.integers(3, vocab_size, size=37 + i % 4).tolist() for i in range(num_prompts)]
    from iapo_jax import load_tokenizer
    from iapo_jax.decoding.inputs import tokenize_prompts

    tok = load_tokenizer(source)
    texts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(num_prompts)]
    return tokenize_prompts(texts, tok, chat=True)[0]


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while `active` (from jax.monitoring)."""

    def __init__(self):
        self.active, self.seconds = False, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, seconds: float, **_):
        if self.active and name.startswith("/jax/core/compile/"):
            self.seconds += seconds


_COMPILE_CLOCK = None


def _timed(fn, repeats: int) -> tuple[float, list[float], float]:
    """(compile seconds of the first call, steady-state seconds of each repeat, peak RSS GB)."""
    global _COMPILE_CLOCK
    _COMPILE_CLOCK = _COMPILE_CLOCK or CompileClock()
    with PeakMemory() as pm:
        _COMPILE_CLOCK.active, _COMPILE_CLOCK.seconds = True, 0.0
        fn(0)
        _COMPILE_CLOCK.active = False
        first = _COMPILE_CLOCK.seconds
        runs = []
        for i in range(repeats):
            t = time.perf_counter()
            fn(i + 1)
            runs.append(time.perf_counter() - t)
    return first, runs, pm.peak_gb


def _our_call(model, prompts, mode: str, n: int, new_tokens: int, block_size: int):
    from iapo_jax.decoding.best_of_n import best_of_n
    from iapo_jax.decoding.blockwise import blockwise_cd
    from iapo_jax.decoding.engine import sample

    scorer = _cheap_scorer()

    def call(seed: int):
        common = dict(max_new_tokens=new_tokens, key=seed, stop_tokens=[])
        if mode == "plain":
            out = sample(model, prompts, n=n, **common)
        elif mode == "best_of_n":
            out = best_of_n(model, prompts, scorer, n=n, **common)
        else:
            out = blockwise_cd(model, prompts, scorer, k=n, block_size=block_size, **common)
        jax.block_until_ready(out.tokens)
        return out

    return call


def _log(message: str) -> None:
    print(message, flush=True)  # progress must show even when stdout is a file


def run_decode_benchmark(cfg, machine: Machine | None, log=_log) -> list[dict]:
    """All records (see module doc); `cfg` has the fields of commands.bench.BenchConfig."""
    from iapo_jax import load_model

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in cfg.models:
            if is_random_model(source):  # written in float32 unless only bfloat16 is measured
                path = make_random_checkpoint(source, Path(tmp) / source,
                                              "float32" if "float32" in cfg.dtypes else "bfloat16")
                prompts = benchmark_prompts(source, cfg.num_prompts, RANDOM_MODELS[source]["vocab_size"])
            else:
                path, prompts = source, benchmark_prompts(source, cfg.num_prompts)
            prompt_len = max(len(p) for p in prompts)
            hf32 = None
            for dtype in cfg.dtypes:
                model = load_model(path, dtype=dtype)
                pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
                n_params = count_params(model)
                hf = None
                if cfg.baseline:
                    hf = load_hf_model(path, dtype, float32_model=hf32 if dtype != "float32" else None)
                    hf32 = hf if dtype == "float32" else hf32
                baseline_cache: dict[int, tuple] = {}
                bon_speed: dict[int, float] = {}
                for mode_name in cfg.modes:
                    mode, n = MODES[mode_name]
                    n = cfg.blockwise_k if n is None else n
                    rows = len(prompts) * n
                    tokens = rows * cfg.max_new_tokens
                    log(f"[bench] {source} {dtype} {mode_name}: {rows} rows x {cfg.max_new_tokens} tokens")
                    first, runs, peak = _timed(
                        _our_call(model, prompts, mode, n, cfg.max_new_tokens, cfg.block_size), cfg.repeats)
                    med = statistics.median(runs)
                    rec = dict(model=source, mode=mode_name, n=n, dtype=dtype, prompts=len(prompts), rows=rows,
                               prompt_len=prompt_len, new_tokens=cfg.max_new_tokens, seconds=med, runs=runs,
                               tokens_per_s=tokens / med, compile_s=first, peak_rss_gb=peak,
                               baseline_tokens_per_s=None, baseline_seconds=None, baseline_runs=None,
                               baseline_peak_rss_gb=None, ratio=None)
                    if mode == "best_of_n":
                        bon_speed[n] = rec["tokens_per_s"]
                    if mode == "blockwise":
                        rec["block_size"] = cfg.block_size
                        rec["vs_best_of_k"] = (rec["tokens_per_s"] / bon_speed[n]) if n in bon_speed else None
                    if hf is not None:
                        if n not in baseline_cache:  # blockwise K compares with generate(N = K)
                            def call(seed, n=n, hf=hf):
                                hf_generate(hf, prompts, n=n, new_tokens=cfg.max_new_tokens, pad_id=pad, seed=seed)
                            _, bruns, bpeak = _timed(call, cfg.repeats)
                            baseline_cache[n] = (statistics.median(bruns), bruns, bpeak)
                        bmed, bruns, bpeak = baseline_cache[n]
                        rec.update(baseline_seconds=bmed, baseline_runs=bruns, baseline_peak_rss_gb=bpeak,
                                   baseline_tokens_per_s=tokens / bmed, ratio=bmed / med)
                    if machine is not None:
                        roof = decode_roofline_tokens_per_s(
                            model.config, n_params, dtype, machine, prompts=len(prompts), branches=n,
                            prompt_len=prompt_len, new_tokens=cfg.max_new_tokens)
                        rec.update(roofline_tokens_per_s=roof, roofline_fraction=rec["tokens_per_s"] / roof,
                                   baseline_roofline_fraction=(rec["baseline_tokens_per_s"] / roof
                                                               if rec["baseline_tokens_per_s"] else None))
                    log(f"[bench]   ours {rec['tokens_per_s']:.1f} tok/s, transformers "
                        f"{rec['baseline_tokens_per_s'] or float('nan'):.1f} tok/s, compile {rec['compile_s']:.1f} s")
                    records.append(rec)
                del model, hf
            if is_random_model(source):
                shutil.rmtree(path, ignore_errors=True)  # an 8B checkpoint is 16-32 GB of disk
    return records
