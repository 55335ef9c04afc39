"""Methods compared at a common KL along their beta sweeps, paired over prompts.

A controller cannot land a short, noisy run within 10% of a target KL (the exact testbed measured
33-44% of runs at 8 samples per prompt). A beta sweep avoids the problem: each method is trained
at a few fixed betas, and its win rate is read off the line through its (KL, W) points at the KL
wanted. This module gives that read-out an honest interval. Every sweep point was evaluated on the
same held-out prompts against the same reference samples, so each bootstrap replicate resamples the
prompts once for all points of all methods. Each point's mean KL and mean win rate are recomputed
on those prompts, each method's line is redrawn, and the replicate's difference is read off it at
the KL. Noise in the KLs (where each point sits) and in the win rates both enter the interval, and
the variation that the methods share from prompt to prompt cancels, as in paired.py.

A KL outside a method's measured range is not read out: the line is not extrapolated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from iapo_jax.evaluation.win_rates import (
    minimum_detectable_difference,
    per_prompt_win_rates,
    percentile_interval,
)


def sweep_arrays(rows: dict[str, dict], method: str, reference_scores, procedure: str, n: int,
                 lam: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(KL, W) per sweep point and prompt, each [points, prompts], of one method's sweep rows."""
    points = [r for r in rows.values() if r.get("method") == method and "beta" in r]
    if not points:
        raise ValueError(f"no sweep rows for method {method!r}")
    missing = [r.get("beta") for r in points if "scores" not in r or "kl_per_prompt" not in r]
    if missing:
        raise ValueError(f"sweep rows of {method} at beta {missing} carry no per-prompt scores and KLs "
                         "(recorded before paired read-outs existed); rerun the sweep to compare it "
                         "paired at matched KL")
    num_prompts = np.shape(reference_scores)[0]
    if any(len(r["kl_per_prompt"]) != num_prompts or len(r["scores"]) != num_prompts for r in points):
        raise ValueError(f"sweep rows of {method} were evaluated on different prompts than the reference's "
                         f"{num_prompts}; a paired read-out needs the same held-out prompts")
    kl = np.asarray([r["kl_per_prompt"] for r in points], np.float64)
    w = np.asarray([per_prompt_win_rates(np.asarray(r["scores"]), reference_scores, procedure, n, lam=lam)
                    for r in points], np.float64)
    return kl, w


def interpolate_each(x: np.ndarray, y: np.ndarray, at: float) -> np.ndarray:
    """np.interp(at, x_i, y_i) for each row i of x, y ([replicates, points]), x sorted per row."""
    order = np.argsort(x, axis=1)
    xs, ys = np.take_along_axis(x, order, 1), np.take_along_axis(y, order, 1)
    return np.asarray([np.interp(at, xi, yi) for xi, yi in zip(xs, ys)])


def matched_kl_differences(rows: dict[str, dict], methods: Sequence[str], reference_scores, procedure: str,
                           n: int, kls: Sequence[float], *, num_resamples: int = 1000,
                           confidence: float = 0.95, seed: int = 0, lam: float | None = None) -> list[dict]:
    """For each KL and each pair of methods (A listed before B): W_A - W_B read along the sweeps at
    that KL, with a paired bootstrap interval over prompts and the minimum detectable difference.
    Each row also gives both methods' read-outs with their own intervals."""
    arrays = {m: sweep_arrays(rows, m, reference_scores, procedure, n, lam) for m in methods}
    num_prompts = np.shape(reference_scores)[0]
    idx = np.random.default_rng(seed).integers(0, num_prompts, size=(num_resamples, num_prompts))
    full = {m: (kl.mean(1), w.mean(1)) for m, (kl, w) in arrays.items()}
    boot = {m: (kl[:, idx].mean(-1).T, w[:, idx].mean(-1).T) for m, (kl, w) in arrays.items()}
    out = []
    for k in kls:
        inside = [m for m in methods if full[m][0].min() <= k <= full[m][0].max()]
        est = {m: float(interpolate_each(full[m][0][None], full[m][1][None], k)[0]) for m in inside}
        reps = {m: interpolate_each(*boot[m], k) for m in inside}
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                row = {"kl": float(k), "a": a, "b": b, "procedure": procedure, "n": int(n),
                       "num_prompts": num_prompts}
                if a not in est or b not in est:
                    row["read_out"] = False  # k is outside a method's measured KLs
                    out.append(row)
                    continue
                d = reps[a] - reps[b]
                lo, hi = percentile_interval(d, confidence)
                se = float(d.std(ddof=1))
                row.update(read_out=True, policy=est[a], baseline=est[b], difference=est[a] - est[b],
                           difference_ci_low=lo, difference_ci_high=hi, difference_se=se,
                           minimum_detectable=minimum_detectable_difference(se, confidence))
                for side, m in (("policy", a), ("baseline", b)):
                    row[f"{side}_ci_low"], row[f"{side}_ci_high"] = percentile_interval(reps[m], confidence)
                out.append(row)
    return out


def matched_kl_differences_table(rows: Sequence[dict], confidence: float = 0.95) -> str:
    """Markdown of matched_kl_differences."""
    pct = f"{confidence:.0%}"
    lines = [f"| KL | A - B | W(A) [{pct}] | W(B) [{pct}] | A - B [{pct}, paired over prompts] | "
             "minimum detectable (80% power) | detected |", "|---:|---|---|---|---|---:|---|"]
    for r in rows:
        if not r["read_out"]:
            lines.append(f"| {r['kl']:.2f} | {r['a']} - {r['b']} | – | – | not read out: outside a "
                         "method's measured KLs | – | – |")
            continue
        detected = "yes" if r["difference_ci_low"] > 0 or r["difference_ci_high"] < 0 else "no"
        lines.append(
            f"| {r['kl']:.2f} | {r['a']} - {r['b']} | {r['policy']:.3f} [{r['policy_ci_low']:.3f}, "
            f"{r['policy_ci_high']:.3f}] | {r['baseline']:.3f} [{r['baseline_ci_low']:.3f}, "
            f"{r['baseline_ci_high']:.3f}] | {r['difference']:+.3f} [{r['difference_ci_low']:+.3f}, "
            f"{r['difference_ci_high']:+.3f}] | {r['minimum_detectable']:.3f} | {detected} |")
    return "\n".join(lines) + "\n"
