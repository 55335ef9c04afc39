"""Choose early-pruning schedules on training prompts, by replaying them on full best-of-16's branches.

A pruned run keeps a subset of full best-of-N's own branches (same key, same continuations; see
`iapo_jax.decoding.pruned_best_of_n`), so with VADER on the partial text as the prefix scorer, a
schedule's outcome is a function of each branch's partial scores at the checkpoints and its final
score. This script samples 16 branches per training-split prompt once, records VADER of every
branch's text at every checkpoint length, and replays every schedule in a grid on that record: the
served response's win rate against pi_ref, paired with full best-of-16's, and the tokens generated.

The prompts are the training split's (chat topics disjoint from the held-out ones), so the
schedules it picks are then measured, with the real pruned decoder, on the held-out prompts by
`run_smollm2.py --schedules vader-partial=...`, free of the selection.

    .venv/bin/python experiments/pruning/search_schedules.py --prompts 128 --out runs/pruning-search
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import jax
import numpy as np
from scipy.stats import spearmanr

from iapo_jax.commands.job_inputs import build_reward, load_model_and_tokenizer, load_prompts, reward_spec
from iapo_jax.decoding.engine import decode_texts, sample
from iapo_jax.evaluation.win_rates import paired_bootstrap_difference, per_prompt_win_rates

MAX_NEW_TOKENS = 48  # the response length of the pruning page's runs (run_smollm2.py's default)
GRID = tuple(range(4, MAX_NEW_TOKENS, 4))  # checkpoint lengths the record covers (tokens)


def record(args) -> dict[str, np.ndarray]:
    """partial [P, N, len(GRID)], final [P, N], lengths [P, N], pool [P, pool] of VADER scores."""
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    reward = build_reward(reward_spec("vader"))
    prompts = load_prompts(None, split="train", categories=(), num_prompts=args.prompts, seed=args.seed)
    partial, final, lengths, pool = [], [], [], []
    for i in range(0, len(prompts), args.batch_prompts):
        chunk = prompts[i:i + args.batch_prompts]
        rep = [p for p in chunk for _ in range(args.n)]
        out = sample(model, chunk, n=args.n, max_new_tokens=MAX_NEW_TOKENS, tokenizer=tokenizer,
                     key=jax.random.fold_in(jax.random.key(args.seed), i))
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        cols = [reward.score(rep, list(decode_texts(tokenizer, toks, np.minimum(lens, t)))) for t in GRID]
        partial.append(np.asarray(cols, np.float64).T.reshape(len(chunk), args.n, len(GRID)))
        final.append(np.asarray(reward.score(rep, list(out.texts)), np.float64).reshape(len(chunk), args.n))
        lengths.append(lens.reshape(len(chunk), args.n))
        ref = sample(model, chunk, n=args.pool, max_new_tokens=MAX_NEW_TOKENS, tokenizer=tokenizer,
                     key=jax.random.fold_in(jax.random.key(args.seed + 10_000), i))
        pool.append(np.asarray(reward.score([p for p in chunk for _ in range(args.pool)], list(ref.texts)),
                               np.float64).reshape(len(chunk), args.pool))
        print(f"[search] sampled {i + len(chunk)}/{len(prompts)} prompts", flush=True)
    return {"partial": np.concatenate(partial), "final": np.concatenate(final),
            "lengths": np.concatenate(lengths), "pool": np.concatenate(pool)}


def replay(rec: dict, schedule: list[tuple], keep_finished: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(served final score [P], tokens generated [P]) of a schedule.

    A step is (checkpoint, keep), or (checkpoint, k_min, k_max, delta) for a per-prompt keep count:
    the k_min best alive branches and any other of the k_max best within delta of the leader.
    keep_finished also keeps every branch that has ended by the checkpoint (it costs no more tokens).
    Branches rank by their partial score, ties to the lower branch index (lax.top_k's order); a
    pruned branch generated min(its length, the checkpoint)."""
    partial, final, lengths = rec["partial"], rec["final"], rec["lengths"]
    alive = np.ones(final.shape, bool)
    tokens = np.zeros(final.shape[0])
    for step in schedule:
        c, k_min, k_max, delta = step if len(step) == 4 else (step[0], step[1], step[1], 0.0)
        score = np.where(alive, partial[:, :, GRID.index(c)], -np.inf)
        rank = np.empty(score.shape, int)  # stable: equal scores keep index order
        np.put_along_axis(rank, np.argsort(-score, axis=1, kind="stable"), np.arange(score.shape[1])[None], 1)
        keep = (rank < k_min) | ((rank < k_max) & (score >= score.max(1, keepdims=True) - delta))
        if keep_finished:
            keep |= lengths <= c
        keep &= alive
        tokens += np.where(alive & ~keep, np.minimum(lengths, c), 0).sum(1)
        alive = keep
    tokens += np.where(alive, lengths, 0).sum(1)
    return np.where(alive, final, -np.inf).max(1), tokens


def schedules(n: int) -> list[list[tuple[int, int]]]:
    """One-, two- and three-checkpoint schedules on the grid with decreasing keep counts."""
    keeps = (12, 8, 6, 5, 4, 3, 2)
    out = []
    for depth in (1, 2, 3):
        for cs in itertools.combinations(GRID, depth):
            for ks in itertools.combinations(keeps, depth):  # keeps is descending, so ks is too
                if ks[0] < n:
                    out.append(list(zip(cs, ks)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-saving", type=float, default=2.1, help="token saving a schedule must reach here "
                    "(above the target's 2x: the held-out prompts' responses end at other lengths)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "record.npz"
    # What the record was sampled with: a record from other settings is refused, not silently reused.
    settings = {"prompts": args.prompts, "n": args.n, "pool": args.pool, "seed": args.seed,
                "max_new_tokens": MAX_NEW_TOKENS, "grid": list(GRID)}
    if cache.is_file():
        rec = dict(np.load(cache))
        recorded = json.loads(str(rec.pop("settings")))
        if recorded != settings:
            raise SystemExit(f"{cache} was sampled with {recorded}, not {settings}; pass those settings or "
                             "another --out")
    else:
        rec = record(args)
        np.savez(cache, **rec, settings=json.dumps(settings))
    full_served, full_tokens = replay(rec, [])
    w_full = per_prompt_win_rates(full_served[:, None], rec["pool"], "sampling", 1)
    rows = []
    for sched in schedules(args.n):
        served, tokens = replay(rec, sched)
        saving = full_tokens.sum() / tokens.sum()
        if saving < args.min_saving:
            continue
        w = per_prompt_win_rates(served[:, None], rec["pool"], "sampling", 1)
        rows.append({"schedule": ",".join(f"{c}:{k}" for c, k in sched), "saving": float(saving),
                     "diff": float((w - w_full).mean()), "same_served_score": float(np.mean(served == full_served))})
    rows.sort(key=lambda r: -r["diff"])
    for r in rows[:5]:  # the interval only for the leaders (4,000 resamples each)
        served, _ = replay(rec, [tuple(map(int, s.split(":"))) for s in r["schedule"].split(",")])
        w = per_prompt_win_rates(served[:, None], rec["pool"], "sampling", 1)
        d = paired_bootstrap_difference(w, w_full, num_resamples=4000, seed=0)
        r.update(diff_low=d.ci_low, diff_high=d.ci_high)
    # How well the partial text ranks the branches by their final score, per checkpoint length.
    rank = {c: float(np.nanmean([spearmanr(rec["partial"][i, :, j], rec["final"][i]).statistic
                                 for i in range(len(rec["final"])) if np.ptp(rec["partial"][i, :, j]) > 0]))
            for j, c in enumerate(GRID)}
    summary = {"prompts": len(rec["final"]), "full_win_rate": float(w_full.mean()),
               "min_saving": args.min_saving, "schedules_reaching_it": len(rows),
               "spearman_partial_final": rank, "best": rows[:50]}
    (args.out / "schedules.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(rows)} schedules save at least {args.min_saving}x tokens on {len(rec['final'])} training prompts; "
          f"full best-of-{args.n} wins {w_full.mean():.3f}")
    print("rank correlation of partial and final VADER by checkpoint: "
          + ", ".join(f"{c}: {r:.2f}" for c, r in rank.items()))
    for r in rows[:15]:
        ci = f" [{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]" if "diff_low" in r else ""
        print(f"{r['schedule']:>18}  tokens x{r['saving']:.2f}  pruned - full {100 * r['diff']:+.2f}{ci} points  "
              f"same served score {r['same_served_score']:.2f}")


if __name__ == "__main__":
    main()
