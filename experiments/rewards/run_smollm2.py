"""Reward model and prefix scorer on SmolLM2-135M-Instruct, sized for a 2-core CPU.

1. ``iapo train-rm``: a Bradley-Terry reward model on SmolLM2's backbone (head on the frozen
   backbone) imitating the harmlessness scorer (1 - P(offensive), alt-profanity-check) from pairs
   of pi_ref samples on chat prompts of the training topics; pairwise agreement with the scorer on
   pairs from prompts of held-out topics.
2. ``iapo train-scorer``: a CD-FUDGE prefix scorer for VADER sentiment on pi_ref rollouts; mean
   squared error to the final reward by prefix length on held-out rollouts, and the win rate of
   blockwise CD (K = 4, M = 4) guided by it against pi_ref, with a bootstrap interval.

    .venv/bin/python experiments/rewards/run_smollm2.py            # full run, writes the results page
    .venv/bin/python experiments/rewards/run_smollm2.py --quick    # a few prompts, no page

Run records (config, seeds, data fingerprints, checkpoints, metrics) go to runs/; `iapo reproduce
RUN_DIR` reruns either job from its record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

from iapo_jax.commands import load_job
from iapo_jax.commands.common import run_job
from iapo_jax.commands.train_rm import TrainRMConfig
from iapo_jax.commands.train_scorer import TrainScorerConfig

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results" / "rewards.md"

RM = TrainRMConfig(
    scorer="harmlessness", num_prompts=96, eval_prompts=32, samples_per_prompt=4, max_new_tokens=24,
    pairing="all", eval_pairing="all", max_length=96, mode="head", steps=300, batch_size=32,
    learning_rate=1e-2, warmup_steps=10, eval_every=50, seed=0)
SCORER = TrainScorerConfig(
    reward="vader", method="fudge", num_prompts=64, samples_per_prompt=4, eval_prompts=32, eval_samples=2,
    max_new_tokens=24, mode="head", steps=60, batch_size=32, learning_rate=3e-4, warmup_steps=10,
    eval_every=20, bucket_edges=(0, 1, 4, 8, 16, 24), cd_k=4, block_size=4, cd_samples=2,
    reference_samples=4, seed=0)
QUICK = {"num_prompts": 8, "eval_prompts": 4, "steps": 20}
TRAINED = {"head": "the scalar head (577 parameters) on the frozen backbone's final hidden states (mode `head`)",
           "lora": "LoRA factors on every attention/MLP kernel plus the head (mode `lora`)",
           "full": "every weight (mode `full`)"}
PAIRING = {"all": "every pair of a prompt's samples with distinct scores",
           "best_worst": "the best sample against the worst of each prompt"}
METHOD = {"fudge": "CD-FUDGE", "cdq": "CD-Q"}


def run(name: str, cfg, runs: Path) -> Path:
    run_dir = runs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_job(load_job(name), cfg, run_dir=run_dir, argv=["experiments/rewards/run_smollm2.py", name])
    return run_dir


def read_record(run_dir: Path) -> tuple[dict, dict, dict]:
    """(metrics, config, info) from a run's manifest.json."""
    rec = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    shown = Path(run_dir).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else Path(run_dir).name
    info = {"run_dir": str(shown), "timings": rec["timings"], "extra": rec.get("extra", {})}
    return rec["metrics"], rec["config"], info


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def rm_section(m: dict, c: dict, info: dict) -> str:
    t = info["timings"]
    stats = info["extra"].get("pair_stats", {})
    lines = [
        f"## 1. Reward model imitating the {c['scorer']} scorer",
        "",
        f"Run record: `{info['run_dir']}`. Backbone SmolLM2-135M-Instruct (float32); trained: "
        f"{TRAINED[c['mode']]}. Pairs: "
        f"{c['samples_per_prompt']} pi_ref samples ({c['max_new_tokens']} tokens, temperature {c['temperature']}) per "
        f"chat prompt, ranked by `{c['scorer']}`; {PAIRING[c['pairing']]}, ties skipped. "
        f"{c['num_prompts']} training prompts (chatterbot train topics), {c['eval_prompts']} held-out prompts "
        f"(eval topics: no prompt or topic shared). AdamW, peak lr {c['learning_rate']}, warmup "
        f"{c['warmup_steps']} + cosine, {c['steps']} steps of {c['batch_size']} pairs.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| training pairs / held-out pairs | {m['train_pairs']} / {m['eval_pairs']} |",
        f"| held-out pairwise agreement with the scorer, before training (zero head: all ties) | "
        f"{m['eval_pairwise_accuracy_before']:.3f} |",
        f"| **held-out pairwise agreement, after training** | **{m['eval_pairwise_accuracy']:.3f}** |",
        f"| held-out agreement on the half of pairs with the larger scorer gap | "
        f"{m['eval_pairwise_accuracy_top_half_gap']:.3f} |",
        f"| training-pair agreement | {m['train_pairwise_accuracy']:.3f} |",
        f"| held-out / training BT loss | {m['eval_loss']:.3f} / {m['train_loss']:.3f} |",
        f"| mean scorer gap of training pairs | {m['mean_scorer_gap']:.4f} |",
    ]
    if stats:
        lines.append(f"| harmlessness of pi_ref samples, mean (std), train prompts | "
                     f"{stats['train']['score_mean']:.3f} ({stats['train']['score_std']:.3f}) |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def scorer_section(m: dict, c: dict, info: dict) -> str:
    t = info["timings"]
    mse = info["extra"].get("mse_by_prefix_length", {})
    lines = [
        f"## 2. {METHOD[c['method']]} prefix scorer for `{c['reward']}`, and blockwise CD with it",
        "",
        f"Run record: `{info['run_dir']}`. Scorer: a ValueModel on a copy of SmolLM2's backbone; trained: "
        f"{TRAINED[c['mode']]}, with the {METHOD[c['method']]} loss on {m['train_rollouts']} pi_ref rollouts "
        f"({c['num_prompts']} training prompts x {c['samples_per_prompt']}, {c['max_new_tokens']} tokens), "
        f"AdamW peak lr {c['learning_rate']}, {c['steps']} steps of {c['batch_size']} rollouts. "
        f"Reward `{c['reward']}`; training rewards mean {m['train_reward_mean']:.3f}, std "
        f"{m['train_reward_std']:.3f}. Held out: {m['eval_rollouts']} rollouts on {c['eval_prompts']} prompts of "
        "other topics." + (f" Rollouts reused from `{Path(c['rollouts_file']).parent.name}` (same sampling settings)."
                           if c.get("rollouts_file") else ""),
        "",
        "Mean squared error of V([x, y^t]) to r(x, y) on held-out rollouts, by prefix length t "
        "(baseline: the training mean as a constant prediction):",
        "",
        "| prefix length t | prefixes | MSE before training | MSE after | constant baseline |",
        "|---|---|---|---|---|",
    ]
    before = {b["t_from"]: b for b in mse.get("before", {}).get("buckets", [])}
    for b in mse.get("after", {}).get("buckets", []):
        lines.append(f"| {b['t_from']}-{b['t_to'] - 1} | {b['prefixes']} | {before.get(b['t_from'], {}).get('mse', float('nan')):.4f} "
                     f"| {b['mse']:.4f} | {b['baseline_mse']:.4f} |")
    if mse:
        a = mse["after"]
        lines.append(f"| all | {a['prefixes']} | {mse['before']['mse']:.4f} | **{a['mse']:.4f}** | {a['baseline_mse']:.4f} |")
    if "blockwise_win_rate" in m:
        lines += [
            "",
            f"Blockwise CD with the trained scorer: K = {c['cd_k']} candidate blocks of M = {c['block_size']} "
            f"tokens from pi_ref, {c['cd_samples']} responses per held-out prompt, against "
            f"{c['reference_samples']} plain pi_ref responses per prompt, both scored by `{c['reward']}`; win rate "
            "W_r(CD > pi_ref) per prompt with ties counted one half, averaged over prompts; 95% percentile "
            f"bootstrap interval over the {int(m['blockwise_prompts'])} prompts.",
            "",
            "| metric | value |",
            "|---|---|",
            f"| **win rate of blockwise CD (K={c['cd_k']}, M={c['block_size']}) vs pi_ref** | **{m['blockwise_win_rate']:.3f}** "
            f"[{m['blockwise_ci_low']:.3f}, {m['blockwise_ci_high']:.3f}] |",
            f"| mean reward: CD / pi_ref | {m['blockwise_cd_reward_mean']:.3f} / "
            f"{m['blockwise_reference_reward_mean']:.3f} |",
            f"| mean KL bound (log K - (K-1)/K) L/M, nats | {m['blockwise_kl_bound_mean']:.2f} |",
            f"| mean response tokens: CD / pi_ref | {m['blockwise_cd_response_tokens']:.1f} / "
            f"{m['blockwise_reference_response_tokens']:.1f} |",
        ]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()), ""]
    return "\n".join(lines)


# What the runs of 2026-11-28 showed beyond their tables (kept with the script that made them).
NOTES = """## Notes on these runs

- Hardware: a 2-core CPU shared with other jobs (load average 3-9 during the runs), so the timings
  are upper bounds: forward passes ran at roughly 50-250 tokens/s, against about 1,000 tokens/s
  measured for this model on an idle machine of the same kind.
- Why mode `head`: LoRA or full fine-tuning needs a forward and backward pass over every sequence of
  every step (about 10 s per step of 32 pairs on an idle machine, several times that under this
  load). With the backbone frozen, its hidden states are computed once (`prepare` in the timings)
  and hundreds of steps take seconds. The jobs run LoRA / full fine-tuning with `--mode lora|full`.
- Reward model: held-out agreement with the harmlessness scorer stays near chance (192 held-out
  pairs; binomial standard error about 0.036). The scorer barely separates SmolLM2's answers to
  chat questions (mean harmlessness 0.957; median gap within a pair 0.02 in P(offensive)), and a
  linear head on the frozen backbone's last-token state does not recover those differences. Checks
  made on the same pairs and features: a validation split of the training prompts (80 / 16) found
  no learning rate (1e-4 to 1e-2), step count (30 to 300) or weight decay (0, 1) that generalised
  (validation agreement 0.47-0.58), and an L2-regularised logistic regression (scikit-learn, C from
  1e-4 to 1) on the same features reached 0.55 held out (0.60 on mean-pooled states, which a
  last-token RewardModel does not read). Imitating this scorer needs a trainable backbone and more
  pairs than this CPU budget allows.
- Prefix scorer: the learning rate and step count were chosen on a validation split of the training
  prompts (48 / 16), over lr {3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2} x steps {30 ... 1000} x weight
  decay {0, 0.1, 1}: lr 3e-4 with 60 steps had the lowest validation MSE (0.083 against 0.111 for
  the constant). A first run with lr 1e-2 and 300 steps (`runs/train-scorer-20261128-090913`, same
  rollouts) overfit (held-out MSE 0.212 against 0.214 for the constant) and still reached a
  blockwise-CD win rate of 0.734 [0.656, 0.807]: blockwise CD only ranks the K continuations of one
  prefix, so a scorer that orders siblings well helps even when its calibration across prompts is
  poor. Prefixes of 0-3 tokens are predicted no better than by the constant: there the value is a
  property of the prompt, and 64 training prompts are too few to learn it.
- For scale: with a continuous reward, best-of-4 under the true reward wins N/(N+1) = 0.8 against
  pi_ref at KL <= log 4 - 3/4 = 0.64 nats; blockwise CD's KL bound, (log K - (K-1)/K) per block,
  adds up over its 6 blocks to the 3.8 nats above (a loose bound).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few prompts and steps; no results page")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--only", choices=("rm", "scorer"), default=None, help="run one of the two jobs")
    parser.add_argument("--rm-run", type=Path, help="use this finished train-rm run instead of running one")
    parser.add_argument("--scorer-run", type=Path, help="use this finished train-scorer run")
    parser.add_argument("--reuse-rollouts", type=Path,
                        help="a train-scorer run directory whose sampled rollouts the new run trains on")
    args = parser.parse_args()
    rm_cfg = dataclasses.replace(RM, **QUICK) if args.quick else RM
    sc_cfg = dataclasses.replace(SCORER, **QUICK) if args.quick else SCORER
    if args.reuse_rollouts is not None:
        sc_cfg = dataclasses.replace(sc_cfg, rollouts_file=args.reuse_rollouts / "rollouts_train.npz",
                                     eval_rollouts_file=args.reuse_rollouts / "rollouts_eval.npz")
    host = machine()
    rm_run, sc_run = args.rm_run, args.scorer_run
    if rm_run is None and args.only in (None, "rm"):
        rm_run = run("train-rm", rm_cfg, args.runs)
    if sc_run is None and args.only in (None, "scorer"):
        sc_run = run("train-scorer", sc_cfg, args.runs)
    sections = []
    if rm_run is not None:
        sections.append(rm_section(*read_record(rm_run)))
    if sc_run is not None:
        sections.append(scorer_section(*read_record(sc_run)))
    page = "\n".join([
        "# Reward models and prefix scorers on SmolLM2-135M-Instruct",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `experiments/rewards/run_smollm2.py` on {host}; "
        "SmolLM2-135M-Instruct dequantised from the packaged Q4_1 GGUF, float32, no accelerator.",
        "",
        *sections,
        NOTES,
    ])
    print(page)
    if args.quick or rm_run is None or sc_run is None:
        print("(results page not written: it needs both runs; pass --rm-run / --scorer-run)")
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(page, encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
