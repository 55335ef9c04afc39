"""The RL-step benchmark: where one CTRL step's time goes on a real model, per training setup.

Each setup (full fine-tuning, LoRA) runs the real `CTRLTrainer` on a packaged reward: one warm-up
step (compilation), then `repeats` timed steps. A step is: merge the policy's weights (LoRA), sample
the rollouts, the reference's log-probs, reward scoring, calibration and the transform (with
advantages), the compiled policy update, and the metrics read back to the host. The trainer's own
StageClock times each stage; the table reports medians over the timed steps.
"""

from __future__ import annotations

import statistics
import time

import jax

from iapo_jax.bench.decode import CompileClock
from iapo_jax.bench.memory import PeakMemory

# CTRLTrainer's StageClock stages, in step order.
STAGES = ("merge", "rollout", "ref_logprobs", "detokenize", "reward", "calibration", "update", "metrics")
SETUPS = {"full": 0, "lora": 8}  # setup -> LoRA rank (0: every weight trains)


def _log(message: str) -> None:
    print(message, flush=True)


def run_train_benchmark(cfg, log=_log) -> list[dict]:
    """One record per (model, dtype, setup); `cfg` has the fields of commands.bench.BenchConfig."""
    from iapo_jax import load_model, load_tokenizer
    from iapo_jax.alignment.ctrl import CTRLTrainer
    from iapo_jax.alignment.ctrl_config import CTRLConfig
    from iapo_jax.data.prompts import load_chat_prompts
    from iapo_jax.rewards.pools import sample_reference_pool
    from iapo_jax.rewards.registry import get_reward

    reward = get_reward(cfg.train_reward)
    prompts = load_chat_prompts("train", limit=cfg.prompts_per_step, seed=0)
    clock = CompileClock()
    records = []
    for source in cfg.models:
        tokenizer = load_tokenizer(source)
        for dtype in cfg.dtypes:
            reference = load_model(source, dtype=dtype)
            pool = sample_reference_pool(reference, tokenizer, reward, prompts, m=cfg.pool_size,
                                         max_new_tokens=cfg.rollout_tokens, key=1)
            for setup in cfg.setups:
                log(f"[bench] {source} {dtype} {setup}: CTRL steps of "
                    f"{cfg.prompts_per_step * cfg.samples_per_prompt} rows x {cfg.rollout_tokens} tokens")
                ctrl_cfg = CTRLConfig(
                    transform="exp", procedure="bon", deploy_n=4, beta=0.1,
                    samples_per_prompt=cfg.samples_per_prompt, prompts_per_step=cfg.prompts_per_step,
                    steps=cfg.repeats + 1, max_new_tokens=cfg.rollout_tokens, lora_rank=SETUPS[setup])
                trainer = CTRLTrainer(ctrl_cfg, load_model(source, dtype=dtype), reference, tokenizer,
                                      reward, pool, prompts)
                with PeakMemory() as pm:
                    clock.active, clock.seconds = True, 0.0
                    t = time.perf_counter()
                    trainer.train_step()
                    first = time.perf_counter() - t
                    clock.active = False
                    timed = [trainer.train_step().metrics for _ in range(cfg.repeats)]
                record = {
                    "model": source, "dtype": dtype, "setup": setup, "lora_rank": SETUPS[setup],
                    "prompts_per_step": cfg.prompts_per_step, "samples_per_prompt": cfg.samples_per_prompt,
                    "rollout_tokens": cfg.rollout_tokens, "reward": cfg.train_reward,
                    "first_step_s": first, "compile_s": clock.seconds, "peak_rss_gb": pm.peak_gb,
                    "step_s": statistics.median(m["step_seconds"] for m in timed),
                    "step_s_all": [m["step_seconds"] for m in timed],
                    "response_tokens": statistics.mean(m["response_tokens"] for m in timed),
                    "device": jax.devices()[0].device_kind,
                }
                for stage in STAGES:
                    record[f"{stage}_s"] = statistics.median(m.get(f"{stage}_seconds", 0.0) for m in timed)
                record["steps_per_hour"] = 3600.0 / record["step_s"]
                log(f"[bench] {source} {dtype} {setup}: {record['step_s']:.2f} s/step "
                    f"(rollout {record['rollout_s']:.2f}, update {record['update_s']:.2f})")
                records.append(record)
                del trainer
            if cfg.baseline and "full" in cfg.setups:
                _add_trl_baseline(cfg, records[-len(cfg.setups):], source, dtype, prompts, reward, log)
    return records


def _add_trl_baseline(cfg, records: list[dict], source, dtype: str, prompts, reward, log) -> None:
    """TRL's RLOO step on the same inputs, next to our full fine-tuning record (TRL fine-tunes
    every weight by default)."""
    from iapo_jax.bench.trl_baseline import trl_available, trl_rloo_step

    full = next(r for r in records if r["setup"] == "full")
    if not trl_available():
        full["baseline"] = "not run: trl is not installed (pip install 'iapo-jax[bench]')"
        log(f"[bench] {full['baseline']}")
        return
    log(f"[bench] {source} {dtype} TRL RLOOTrainer: steps of "
        f"{cfg.prompts_per_step * cfg.samples_per_prompt} rows x {cfg.rollout_tokens} tokens")
    full.update(trl_rloo_step(source, dtype, list(prompts), reward,
                              samples_per_prompt=cfg.samples_per_prompt,
                              rollout_tokens=cfg.rollout_tokens, repeats=cfg.repeats))
    full["ratio"] = full["baseline_step_s"] / full["step_s"]
    log(f"[bench] TRL: {full['baseline_step_s']:.2f} s/step; ours {full['ratio']:.2f}x faster")


def train_table(records: list[dict], machine_line: str) -> str:
    """Markdown: seconds per stage (medians), the step, and how many steps fit in an hour."""
    head = ("| model | dtype | setup | " + " | ".join(STAGES) + " | step (s) | steps/hour | "
            "first step (s) | peak RSS (GB) |")
    out = [machine_line, "", head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        stages = " | ".join(f"{r[f'{s}_s']:.2f}" for s in STAGES)
        out.append(f"| {r['model']} | {r['dtype']} | {r['setup']} | {stages} | {r['step_s']:.2f} | "
                   f"{r['steps_per_hour']:.0f} | {r['first_step_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    trl = [r for r in records if "baseline_step_s" in r]
    if trl:
        out += ["", f"Against {trl[0]['baseline']} (full fine-tuning, same weights, prompts, batch, lengths, "
                    "dtype and reward, in the same run):", "",
                "| model | dtype | ours (s/step) | TRL (s/step) | ratio | TRL generation | TRL reward | "
                "TRL log-probs + update |", "|---|---|---|---|---|---|---|---|"]
        for r in trl:
            out.append(f"| {r['model']} | {r['dtype']} | {r['step_s']:.2f} | {r['baseline_step_s']:.2f} | "
                       f"{r['ratio']:.2f} | {r['baseline_generation_s']:.2f} | {r['baseline_reward_s']:.2f} | "
                       f"{r['baseline_rest_s']:.2f} |")
    missing = [r["baseline"] for r in records if isinstance(r.get("baseline"), str) and r["baseline"].startswith("not run")]
    if missing:
        out += ["", f"TRL baseline {missing[0]}."]
    if records:
        r = records[0]
        out += ["", f"One step: {r['prompts_per_step']} prompts x {r['samples_per_prompt']} samples x "
                    f"{r['rollout_tokens']} new tokens (mean response {r['response_tokens']:.1f} tokens), "
                    f"reward {r['reward']}, CTRL exp transform; medians of the timed steps after one "
                    "warm-up step."]
    return "\n".join(out)
