"""How closely does a KL controller land a run on its target KL? Summarise ``iapo testbed`` runs.

    for seed in 0 1 2 3; do for sched in constant cosine; do
      iapo testbed --transforms identity exp negexp --kls 0.25 0.5 1 --options rloo --steps 150 \
        --samples-per-prompt 8 --eval-every 25 --lr-schedule $sched --seed $seed \
        --kl-controller proportional --kl-controller-gain 0.2 --run-dir runs/kl-prop-$sched-$seed
      # ... and --kl-controller predictive (its default gain) into runs/kl-pred-$sched-$seed
    done; done
    python experiments/testbed/kl_controllers.py runs/kl-* --out experiments/results/testbed/kl-controllers

Runs are grouped by their settings without the seed (controller, gain, schedule, samples per
prompt, learning rate, steps, start factor). Per group: the share of runs whose exact final KL is
within 10% of the target, the median and 90th percentile of |KL / target - 1|, the median
|W - W_opt|, and each (transform, KL) cell's errors by seed. Writes kl_controllers.md and
kl_controllers.json into --out.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

GROUP_KEYS = ("kl_controller", "kl_controller_gain", "lr_schedule", "samples_per_prompt", "learning_rate",
              "steps", "start_beta_factor")
KL_TOLERANCE = 0.10


def load(run_dir: Path) -> tuple[tuple, int, list[dict]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    cfg = manifest["config"]
    records = json.loads((run_dir / "testbed.json").read_text())["records"]
    return tuple(cfg[k] for k in GROUP_KEYS), cfg["seed"], records


def summarise(groups: dict[tuple, list[tuple[int, dict]]]) -> list[dict]:
    rows = []
    for key, runs in groups.items():
        kl_err = np.array([abs(r["kl_relative_error"]) for _, r in runs])
        w_err = np.array([abs(r["win_rate_error"]) for _, r in runs])
        cells = collections.defaultdict(list)
        for seed, r in sorted(runs, key=lambda x: x[0]):
            cells[f"{r['transform']}@{r['target_kl']:g}"].append(round(r["kl_relative_error"], 4))
        rows.append({**dict(zip(GROUP_KEYS, key)), "runs": len(runs),
                     "seeds": sorted({s for s, _ in runs}),
                     "within_10pct": float(np.mean(kl_err <= KL_TOLERANCE)),
                     "median_abs_kl_error": float(np.median(kl_err)),
                     "p90_abs_kl_error": float(np.quantile(kl_err, 0.9)),
                     "median_abs_win_rate_error": float(np.median(w_err)), "cells": dict(cells)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| controller (gain) | lr schedule | samples / prompt | lr | runs | within ±10% | median \\|KL err\\| "
             "| p90 \\|KL err\\| | median \\|W − W_opt\\| |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = "default" if r["kl_controller_gain"] is None else f"{r['kl_controller_gain']:g}"
        lines.append(f"| {r['kl_controller']} ({gain}) | {r['lr_schedule']} | {r['samples_per_prompt']} | "
                     f"{r['learning_rate']:g} | {r['runs']} | {r['within_10pct']:.0%} | "
                     f"{r['median_abs_kl_error']:.1%} | {r['p90_abs_kl_error']:.0%} | "
                     f"{r['median_abs_win_rate_error']:.3f} |")
    lines += ["", "KL / target − 1 by cell, one entry per seed:", ""]
    for r in rows:
        gain = "default" if r["kl_controller_gain"] is None else f"{r['kl_controller_gain']:g}"
        cells = "; ".join(f"{c}: " + ", ".join(f"{e:+.0%}" for e in es) for c, es in r["cells"].items())
        lines.append(f"- {r['kl_controller']} ({gain}), {r['lr_schedule']}, {r['samples_per_prompt']} samples, "
                     f"lr {r['learning_rate']:g}: {cells}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    groups: dict[tuple, list[tuple[int, dict]]] = collections.defaultdict(list)
    for run_dir in args.runs:
        key, seed, records = load(run_dir)
        groups[key].extend((seed, r) for r in records)
    rows = summarise(dict(sorted(groups.items(), key=lambda kv: str(kv[0]))))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kl_controllers.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows)
    (args.out / "kl_controllers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
