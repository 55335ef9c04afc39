"""Do per-prompt keep counts beat fixed ones? Replayed on the schedule search's record.

A fixed schedule keeps K branches at a checkpoint whatever the prompt. An adaptive rule keeps every
branch whose partial VADER is within delta of the prompt's leader, at least k_min and at most
k_max, so a prompt with a clear leader is pruned harder than one whose branches still tie (47% of
partial scores are exactly 0 at 16 tokens). A branch that has already ended costs nothing more to
keep, so a rule may also keep every finished branch on top. An adaptive first checkpoint may be
followed by one fixed one. The grid is replayed on `search_schedules.py`'s record of 128 training
prompts x 16 branches and compared with the best fixed schedule at the same >= 2x token saving.

    .venv/bin/python experiments/pruning/search_adaptive_keeps.py \
        --record experiments/results/pruning/schedule-search/record.npz --out runs/pruning-adaptive
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from iapo_jax.evaluation.win_rates import paired_bootstrap_difference, per_prompt_win_rates
from search_schedules import replay

DELTAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # on VADER's [-1, 1] compound scale


def grid() -> list[list[tuple[int, int, int, float]]]:
    """An adaptive first checkpoint, alone or followed by a fixed later one."""
    out = []
    for c, k_min, k_max, delta in itertools.product((8, 12, 16, 20, 24), (1, 2, 3, 4), (4, 6, 8, 12), DELTAS):
        if k_min >= k_max:
            continue
        first = (c, k_min, k_max, delta)
        out.append([first])
        out += [[first, (c2, k2, k2, 0.0)] for c2 in (24, 28, 32, 40) if c2 > c for k2 in (2, 3, 4) if k2 < k_max]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", type=Path, required=True, help="search_schedules.py's record.npz")
    ap.add_argument("--min-saving", type=float, default=2.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rec = dict(np.load(args.record))
    rec.pop("settings")
    full_served, full_tokens = replay(rec, [])
    w_full = per_prompt_win_rates(full_served[:, None], rec["pool"], "sampling", 1)

    def measured(rules, keep_finished):
        served, tokens = replay(rec, rules, keep_finished)
        w = per_prompt_win_rates(served[:, None], rec["pool"], "sampling", 1)
        return w, float(full_tokens.sum() / tokens.sum())

    rows = []
    for rules, keep_finished in itertools.product(grid(), (False, True)):
        w, saving = measured(rules, keep_finished)
        if saving >= args.min_saving:
            rows.append({"rules": rules, "keep_finished": keep_finished, "saving": saving,
                         "diff": float((w - w_full).mean())})
    rows.sort(key=lambda r: -r["diff"])
    fixed = [(8, 8, 8, 0.0), (28, 5, 5, 0.0), (40, 2, 2, 0.0)]  # the fixed search's best at >= 2x
    fixed_row = {"rules": fixed, "keep_finished": False, "fixed": True}
    for r in rows[:5] + [fixed_row]:
        w, r["saving"] = measured(r["rules"], r["keep_finished"])
        d = paired_bootstrap_difference(w, w_full, num_resamples=4000, seed=0)
        r.update(diff=d.difference, diff_low=d.ci_low, diff_high=d.ci_high)
        print(f"{'fixed ' if r.get('fixed') else ''}{r['rules']} keep finished {r['keep_finished']}: "
              f"tokens x{r['saving']:.2f}, pruned - full {100 * r['diff']:+.2f} "
              f"[{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}] points")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptive_keeps.json").write_text(json.dumps(
        {"prompts": len(rec["final"]), "min_saving": args.min_saving, "rules_reaching_it": len(rows),
         "fixed_best": fixed_row, "best": rows[:20]}, indent=1) + "\n")
    print(f"{len(rows)} rules save at least {args.min_saving}x tokens")


if __name__ == "__main__":
    main()
