"""Inference-time win rates W^T(pi > pi_ref) from samples of both policies (algorithms.md §1).

For each prompt we hold the rewards of n_a samples from pi and n_b samples from pi_ref. The
procedure T (plain sampling, best-of-N, worst-of-N) is applied to each side's empirical reward
distribution exactly: the maximum of N draws has CDF F(v)^N and the minimum has survival
(1 - F(v))^N. This plug-in estimator uses every sample (no arbitrary N-subsets) and counts ties
one half. Intervals come from a bootstrap over prompts, which is the unit of independence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PROCEDURES = ("sampling", "bon", "won")


@dataclasses.dataclass(frozen=True)
class WinRate:
    procedure: str
    n: int
    win_rate: float
    ci_low: float
    ci_high: float
    num_prompts: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(procedure: str, n: int) -> None:
    if procedure not in PROCEDURES:
        raise ValueError(f"unknown procedure {procedure!r}; choose one of {PROCEDURES}")
    if int(n) < 1:
        raise ValueError(f"N must be at least 1 (got {n}); use N=1 for plain sampling")


def _served_pmf(values: np.ndarray, support: np.ndarray, procedure: str, n: int) -> np.ndarray:
    """P(served reward == support[j]) when T picks the max / min of n draws from `values`."""
    cdf = np.searchsorted(np.sort(values), support, side="right") / len(values)
    prev = np.concatenate([[0.0], cdf[:-1]])
    if procedure == "won":
        # P(min >= v_j) - P(min >= v_{j+1}), with P(min >= v_j) = (1 - F(v_{j-1}))^n.
        surv = (1.0 - prev) ** n
        return surv - np.concatenate([surv[1:], [0.0]])
    k = 1 if procedure == "sampling" else n
    return cdf**k - prev**k


def per_prompt_win_rates(policy_scores, reference_scores, procedure: str = "sampling", n: int = 1):
    """W_r(T(pi) > T(pi_ref) | x) for each prompt; scores are [P, n_a] and [P, n_b] arrays."""
    _check(procedure, n)
    a = np.asarray(policy_scores, dtype=np.float64)
    b = np.asarray(reference_scores, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"scores must be [prompts, samples] with the same number of prompts; got {a.shape} "
            f"and {b.shape}"
        )
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("scores contain NaN; check the reward function's output")
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        support = np.unique(np.concatenate([a[i], b[i]]))
        pa = _served_pmf(a[i], support, procedure, n)
        pb = _served_pmf(b[i], support, procedure, n)
        below_b = np.concatenate([[0.0], np.cumsum(pb)[:-1]])
        out[i] = float(np.sum(pa * (below_b + 0.5 * pb)))
    return out


def inference_time_win_rate(policy_scores, reference_scores, procedure="sampling", n=1) -> float:
    return float(np.mean(per_prompt_win_rates(policy_scores, reference_scores, procedure, n)))


def bootstrap_win_rate(
    policy_scores,
    reference_scores,
    procedure: str = "sampling",
    n: int = 1,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRate:
    """Win rate with a percentile bootstrap interval over prompts (fixed seed: reproducible)."""
    per_prompt = per_prompt_win_rates(policy_scores, reference_scores, procedure, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_prompt), size=(num_resamples, len(per_prompt)))
    means = per_prompt[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return WinRate(procedure, int(n), float(per_prompt.mean()), float(lo), float(hi), len(per_prompt))
