"""Early-pruned best-of-16 on SmolLM2-135M-Instruct with VADER: the trade-off between the served
response's quality and the compute saved, over pruning schedules and two prefix scorers.

For each held-out chat prompt and seed, full best-of-16 and every pruned variant run with the same
key, so each pruned run's survivors are full best-of-16's own branches (see
`iapo_jax.decoding.pruned_best_of_n`) and the comparison is paired. Quality is the served
response's win rate against pi_ref (VADER against a pool of pi_ref samples per prompt, ties
counting half); compute is tokens generated, batch rows decoded and wall time, all relative to
full best-of-16 in the same run.

    .venv/bin/python experiments/pruning/run_smollm2.py --scorer runs/scorer-vader-48
    .venv/bin/python experiments/pruning/run_smollm2.py --scorer RUN --quick   # smoke run, no page

The scorer is the run directory of `iapo train-scorer` (CD-FUDGE on VADER); the README gives the
command that trains the one used for the committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from iapo_jax.commands.bench import machine_name
from iapo_jax.commands.job_inputs import build_reward, load_model_and_tokenizer, load_prompts, reward_spec
from iapo_jax.decoding.best_of_n import best_of_n
from iapo_jax.decoding.engine import sample
from iapo_jax.decoding.pruned_best_of_n import PruneSchedule, pruned_best_of_n
from iapo_jax.evaluation.win_rates import paired_bootstrap_difference, per_prompt_win_rates
from iapo_jax.rewards.spec import build_scorers

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
SCHEDULES = {"fudge": ("8:2", "8:4", "16:4", "8:8,16:4", "24:4"),
             "vader-partial": ("8:4", "16:4", "24:4", "8:8,16:4", "8:8,24:4", "12:8,24:4"),
             "fudge+vader": ("16:4", "8:8,24:4")}


def served_rewards(reward, prompts, texts) -> np.ndarray:
    return np.asarray(reward.score(list(prompts), list(texts)), np.float64)


def batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scorer", type=Path, help="an `iapo train-scorer` run directory (CD-FUDGE)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=24, help="held-out chat prompts (eval topics)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--pool", type=int, default=16, help="pi_ref samples per prompt for the win rate")
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--schedules", nargs="+", metavar="SCORER=T:K[,T:K]",
                    help="run only these, e.g. vader-partial=16:4 fudge=8:8,16:4 (default: the page's set)")
    ap.add_argument("--name", default="pruned_bon", help="results file stem under experiments/results/")
    ap.add_argument("--quick", action="store_true", help="4 prompts, 1 seed, 3 schedules; no page")
    ap.add_argument("--page-only", action="store_true",
                    help="rebuild the page and plot from experiments/results/NAME.json")
    args = ap.parse_args()
    if args.page_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        write_page(saved["meta"], saved["rows"], args.name)
        plot(saved["rows"], args.name)
        return
    if args.scorer is None:
        ap.error("--scorer RUN_DIR is required (the CD-FUDGE scorer, e.g. experiments/results/pruning/scorer-vader-48)")
    if args.quick:
        args.prompts, args.seeds, args.pool = 4, 1, 4
    schedules = ({"fudge": ("8:4",), "vader-partial": ("8:4",), "fudge+vader": ("8:8,24:4",)} if args.quick
                 else SCHEDULES)
    if args.schedules:
        schedules = {}
        for item in args.schedules:
            scorer, _, sched = item.partition("=")
            if scorer not in SCHEDULES or not sched:
                ap.error(f"--schedules {item!r}: write SCORER=T:K with SCORER one of {sorted(SCHEDULES)}")
            schedules.setdefault(scorer, ())
            schedules[scorer] += (sched,)
    for group in schedules.values():
        for s in group:
            PruneSchedule.parse(s).check(args.n, args.max_new_tokens)

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    reward = build_reward(reward_spec("vader"))
    [(fudge, _)] = build_scorers(reward_spec(str(args.scorer), flag="--scorer"), model)
    # fudge+vader: the value head's prediction of the final VADER and VADER of the text so far,
    # equally weighted (both in VADER's units).
    prefix_scorers = {"fudge": fudge, "vader-partial": reward, "fudge+vader": [(fudge, 0.5), (reward, 0.5)]}
    prompts = load_prompts(None, split="eval", categories=(), num_prompts=args.prompts, seed=0)
    common = {"max_new_tokens": args.max_new_tokens, "tokenizer": tokenizer}
    load_start = os.getloadavg()[0]

    # pi_ref's pool: its own key stream, separate from every best-of-N run.
    pool = []
    for i, chunk in enumerate(batches(prompts, args.batch_prompts)):
        out = sample(model, chunk, n=args.pool, key=jax.random.fold_in(jax.random.key(10_000), i), **common)
        pool.append(served_rewards(reward, [p for p in chunk for _ in range(args.pool)], out.texts)
                    .reshape(len(chunk), args.pool))
    pool = np.concatenate(pool)

    configs = [("full", "none", None)] + [(name, s, prefix_scorers[name])
                                          for name, group in schedules.items() for s in group]
    results = {}
    for name, sched, scorer in configs:
        label = f"{name} {sched}"
        print(f"[pruning] {label}", flush=True)
        # Warm-up on the first batch so the timed calls do not include compilation.
        if sched == "none":
            best_of_n(model, prompts[:args.batch_prompts], reward, n=args.n, key=0, **common)
        else:
            pruned_best_of_n(model, prompts[:args.batch_prompts], reward, scorer, n=args.n, schedule=sched,
                             key=0, **common)
        served = np.zeros((len(prompts), args.seeds))
        branch = np.zeros((len(prompts), args.seeds), np.int64)
        tokens = np.zeros((len(prompts), args.seeds), np.int64)
        rows, seconds = 0, 0.0
        for seed in range(args.seeds):
            for i, chunk in enumerate(batches(prompts, args.batch_prompts)):
                lo = i * args.batch_prompts
                key = jax.random.fold_in(jax.random.key(seed + 1), i)
                t0 = time.perf_counter()
                if sched == "none":
                    out = best_of_n(model, chunk, reward, n=args.n, key=key, **common)
                    chosen = np.asarray(out.chosen)
                    tokens[lo:lo + len(chunk), seed] = np.asarray(out.lengths).sum(1)
                    rows += args.n * len(chunk) * int(np.asarray(out.lengths).max())
                    branch[lo:lo + len(chunk), seed] = chosen
                else:
                    out = pruned_best_of_n(model, chunk, reward, scorer, n=args.n, schedule=sched, key=key,
                                           **common)
                    tokens[lo:lo + len(chunk), seed] = out.generated_tokens
                    rows += out.decoded_rows
                    branch[lo:lo + len(chunk), seed] = np.asarray(out.best_branch)
                seconds += time.perf_counter() - t0
                served[lo:lo + len(chunk), seed] = np.take_along_axis(
                    np.asarray(out.scores), np.asarray(out.chosen)[:, None], 1)[:, 0]
        results[label] = {"name": name, "schedule": sched, "served": served, "branch": branch,
                          "tokens": tokens, "rows": rows, "seconds": seconds}

    full = results["full none"]
    w_full = per_prompt_win_rates(full["served"], pool, "sampling", 1)
    table = []
    for label, r in results.items():
        w = per_prompt_win_rates(r["served"], pool, "sampling", 1)
        diff = paired_bootstrap_difference(w, w_full, num_resamples=4000, seed=0)
        table.append({
            "prefix_scorer": r["name"], "schedule": r["schedule"], "win_rate": float(w.mean()),
            "diff": diff.difference, "diff_low": diff.ci_low, "diff_high": diff.ci_high,
            "same_served": float(np.mean(r["branch"] == full["branch"])),
            "mean_reward": float(r["served"].mean()),
            "tokens": int(r["tokens"].sum()), "token_saving": float(full["tokens"].sum() / r["tokens"].sum()),
            "rows_saving": float(full["rows"] / r["rows"]), "seconds": r["seconds"],
            "speedup": float(full["seconds"] / r["seconds"])})
    meta = {"model": "SmolLM2-135M-Instruct (float32)", "reward": "vader", "n": args.n,
            "max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "seeds": args.seeds,
            "pool": args.pool, "scorer": str(args.scorer), "machine": machine_name(),
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "scorer_record": scorer_record(Path(args.scorer))}
    for row in table:
        print(f"{row['prefix_scorer']:>14} {row['schedule']:>9}  W {row['win_rate']:.3f}  "
              f"dW {row['diff']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]  "
              f"same {row['same_served']:.2f}  tokens x{row['token_saving']:.2f}  "
              f"wall x{row['speedup']:.2f}")
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1) + "\n")
    write_page(meta, table, args.name)
    plot(table, args.name)


def scorer_record(run_dir: Path) -> dict:
    """How the CD-FUDGE scorer was trained and how well it predicts (from its run record)."""
    record = json.loads((run_dir / "manifest.json").read_text())
    metrics = record.get("metrics", {})
    return {"command": " ".join(record["command"]["argv"]), "eval_mse": metrics.get("eval_mse"),
            "eval_baseline_mse": metrics.get("eval_baseline_mse")}


def target_line(table: list[dict]) -> str:
    """The issue's target: within 1 point of full best-of-N (paired interval) at >= 2x fewer tokens."""
    pruned = [r for r in table if r["schedule"] != "none"]
    meet = [r for r in pruned if r["token_saving"] >= 2 and r["diff_low"] >= -0.01]
    if meet:
        best = max(meet, key=lambda r: r["token_saving"])
        return (f"Target met: {best['prefix_scorer']} {best['schedule']} is within 1 point of full best-of-N "
                f"({100 * best['diff']:+.1f} [{100 * best['diff_low']:+.1f}, {100 * best['diff_high']:+.1f}]) "
                f"with {best['token_saving']:.2f}x fewer tokens.")
    near = max([r for r in pruned if r["token_saving"] >= 1.9] or pruned, key=lambda r: r["diff"])
    return (f"Target (within 1 point of full best-of-N, paired interval, with at least 2x fewer tokens) not "
            f"met. Closest: {near['prefix_scorer']} {near['schedule']}, {100 * near['diff']:+.1f} "
            f"[{100 * near['diff_low']:+.1f}, {100 * near['diff_high']:+.1f}] points with "
            f"{near['token_saving']:.2f}x fewer tokens ({near['speedup']:.2f}x less wall time).")


def write_page(meta: dict, table: list[dict], name: str = "pruned_bon") -> None:
    lines = [
        "# Early-pruned best-of-N on SmolLM2: quality against compute",
        "",
        f"Generated by `experiments/pruning/{meta['command']}` at commit {meta['commit']} on "
        f"{meta['machine']} (load average {meta['load_average_start']:.1f} at the start, "
        f"{meta['load_average_end']:.1f} at the end).",
        "",
        f"{meta['model']}, reward VADER, N = {meta['n']}, {meta['max_new_tokens']} new tokens at temperature "
        f"1, {meta['prompts']} held-out chat prompts (eval topics) x {meta['seeds']} seeds. Each pruned run "
        "uses full best-of-N's key, so its survivors are full best-of-N's own branches and every "
        "difference is paired. Win rate: the served response's VADER against "
        f"{meta['pool']} pi_ref samples per prompt (ties count half). Difference: pruned minus full "
        "best-of-N, mean over prompts with a 95% paired bootstrap interval over prompts. "
        "`same served`: how often the pruned run served the very response full best-of-N served. "
        "Savings are full best-of-N's count over the pruned run's, measured in the same run: tokens "
        "generated (every branch up to its end or its pruning), batch rows decoded (the compute: "
        "rows x steps of the compiled loop) and wall time (compilation excluded).",
        "",
        "Schedule `T:K` keeps the K best branches after T tokens. Prefix scorers: `fudge`, a CD-FUDGE "
        f"value head trained on pi_ref rollouts (`{Path(meta['scorer']).name}`); `vader-partial`, VADER "
        "on the partial text; `fudge+vader`, their mean.",
        "",
        *([f"The CD-FUDGE scorer's run record is committed in "
           f"[pruning/scorer-vader-48/](pruning/scorer-vader-48/) (`{meta['scorer_record']['command']}`): "
           f"held-out mean squared error to the final VADER {meta['scorer_record']['eval_mse']:.3f}, "
           f"against {meta['scorer_record']['eval_baseline_mse']:.3f} for the constant mean.", ""]
          if meta.get("scorer_record") else []),
        target_line(table),
        "",
        "| prefix scorer | schedule | win rate vs pi_ref | pruned - full (95% paired CI) | same served | "
        "tokens saved | rows saved | wall-time speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        scorer = "— (full best-of-N)" if r["schedule"] == "none" else r["prefix_scorer"]
        diff = "—" if r["schedule"] == "none" else \
            f"{100 * r['diff']:+.1f} [{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]"
        lines.append(f"| {scorer} | {r['schedule']} | {100 * r['win_rate']:.1f} | {diff} | "
                     f"{r['same_served']:.2f} | {r['token_saving']:.2f}x | {r['rows_saving']:.2f}x | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", f"![trade-off]({name}.png)", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def plot(table: list[dict], name: str = "pruned_bon") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for scorer, marker in (("fudge", "o"), ("vader-partial", "s"), ("fudge+vader", "^")):
        rows = [r for r in table if r["prefix_scorer"] == scorer]
        if not rows:
            continue
        x = [r["token_saving"] for r in rows]
        y = [100 * r["diff"] for r in rows]
        err = [[100 * (r["diff"] - r["diff_low"]) for r in rows], [100 * (r["diff_high"] - r["diff"]) for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=scorer)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["schedule"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-1, color="grey", ls="--", lw=0.8, label="1 point below full best-of-N")
    ax.set_xlabel("tokens generated: full best-of-N / pruned")
    ax.set_ylabel("win rate vs pi_ref: pruned - full (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
