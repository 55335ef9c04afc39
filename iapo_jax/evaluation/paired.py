"""Two policies evaluated on the same prompts against the same reference samples.

For each inference-time procedure T (sampling, BoN_N, WoN_N): each policy's win rate against
pi_ref, their difference with a paired bootstrap interval (prompts resampled jointly, so the
prompt-to-prompt variation both share cancels), and the head-to-head win rate W^T(A > B) of the
two policies' own samples, with its bootstrap interval over prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from iapo_jax.evaluation.win_rates import (
    bootstrap_win_rate,
    paired_bootstrap_difference,
    per_prompt_win_rates,
    pool_calibration,
)


def paired_rows(a_scores, b_scores, reference_scores, procedures: Sequence[str], ns: Sequence[int], *,
                num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                lam: float | None = None, selection=None) -> list[dict]:
    """One row per (procedure, N): a and b against the reference, a - b (paired) and a vs b.

    Scores are [prompts, samples] arrays on the same prompts in the same order. soft_bon (selection
    temperature lam) selects every side on its calibration against the reference's samples, as
    the analytic tool does. selection: (a, b, reference) scores that the procedures select on when
    the scores only judge (default: the scores themselves).
    """
    a, b, ref = (np.asarray(x, np.float64) for x in (a_scores, b_scores, reference_scores))
    sa, sb, sref = (a, b, ref) if selection is None else (np.asarray(x, np.float64) for x in selection)
    if not (a.shape[0] == b.shape[0] == ref.shape[0]):
        raise ValueError(f"the two policies and the reference must share prompts; got {a.shape[0]}, "
                         f"{b.shape[0]} and {ref.shape[0]} prompts")
    rows = []
    for procedure in procedures:
        kw = {"against": ({"selection": (sa, sref)}, {"selection": (sb, sref)}),
              "head": {"selection": (sa, sb)}}
        if procedure == "soft_bon":
            ca, cb, cref = (pool_calibration(x, sref) for x in (sa, sb, sref))
            kw = {"against": ({"lam": lam, "selection": (ca, cref)}, {"lam": lam, "selection": (cb, cref)}),
                  "head": {"lam": lam, "selection": (ca, cb)}}
        for n in ((1,) if procedure == "sampling" else tuple(dict.fromkeys(ns))):
            kw_a, kw_b = kw["against"]
            wa = per_prompt_win_rates(a, ref, procedure, n, **kw_a)
            wb = per_prompt_win_rates(b, ref, procedure, n, **kw_b)
            diff = paired_bootstrap_difference(wa, wb, num_resamples=num_resamples,
                                               confidence=confidence, seed=seed)
            head = bootstrap_win_rate(a, b, procedure, n, num_resamples=num_resamples,
                                      confidence=confidence, seed=seed, **kw["head"])
            rows.append({"procedure": procedure, "n": int(n), "policy": float(wa.mean()),
                         "baseline": float(wb.mean()), "difference": diff.difference,
                         "difference_ci_low": diff.ci_low, "difference_ci_high": diff.ci_high,
                         "difference_se": diff.se, "minimum_detectable": diff.minimum_detectable,
                         "head_to_head": head.win_rate, "head_to_head_ci_low": head.ci_low,
                         "head_to_head_ci_high": head.ci_high, "num_prompts": diff.num_prompts})
    return rows


def paired_table(rows: Sequence[dict], confidence: float = 0.95) -> str:
    """Markdown of paired_rows."""
    label = {"sampling": "sampling", "bon": "best-of-N", "won": "worst-of-N", "soft_bon": "soft best-of-N"}
    pct = f"{confidence:.0%}"
    lines = [f"| procedure | N | W(policy) | W(baseline) | difference [{pct}, paired] | "
             f"minimum detectable (80% power) | W(policy > baseline) [{pct}] |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {label[r['procedure']]} | {r['n']} | {r['policy']:.4f} | {r['baseline']:.4f} | "
                     f"{r['difference']:+.4f} [{r['difference_ci_low']:+.4f}, {r['difference_ci_high']:+.4f}] | "
                     f"{r['minimum_detectable']:.4f} | "
                     f"{r['head_to_head']:.4f} [{r['head_to_head_ci_low']:.4f}, "
                     f"{r['head_to_head_ci_high']:.4f}] |")
    return "\n".join(lines) + "\n"


def method_differences(scores: dict[str, np.ndarray], reference_scores, procedures: Sequence[str],
                       ns: Sequence[int], *, selection: tuple[dict, np.ndarray] | None = None,
                       **kwargs) -> list[dict]:
    """paired_rows for every pair of methods (A listed before B: A - B), named in each row.

    scores: method -> [prompts, samples] scores of its fresh samples, all on the same prompts.
    selection: (method -> selection scores, the reference's) when the scores only judge."""
    names = list(scores)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if selection is not None:
                kwargs["selection"] = (selection[0][a], selection[0][b], selection[1])
            for row in paired_rows(scores[a], scores[b], reference_scores, procedures, ns, **kwargs):
                rows.append({"a": a, "b": b, **row})
    return rows


def differences_table(rows: Sequence[dict], confidence: float = 0.95) -> str:
    """Markdown of method_differences: A - B with its paired interval and minimum detectable
    difference, per procedure."""
    label = {"sampling": "sampling", "bon": "BoN", "won": "WoN", "soft_bon": "soft-BoN"}
    pct = f"{confidence:.0%}"
    lines = [f"| A - B | procedure | W(A) | W(B) | A - B [{pct}, paired over prompts] | "
             "minimum detectable (80% power) | detected |", "|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        detected = "yes" if r["difference_ci_low"] > 0 or r["difference_ci_high"] < 0 else "no"
        lines.append(f"| {r['a']} - {r['b']} | {label[r['procedure']]}_{r['n']} | {r['policy']:.3f} | "
                     f"{r['baseline']:.3f} | {r['difference']:+.3f} [{r['difference_ci_low']:+.3f}, "
                     f"{r['difference_ci_high']:+.3f}] | {r['minimum_detectable']:.3f} | {detected} |")
    return "\n".join(lines) + "\n"
