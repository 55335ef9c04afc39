"""Inference-time win rates W^T(pi > pi_ref) from samples of both policies (algorithms.md §1).

For each prompt we hold the rewards of n_a samples from pi and n_b samples from pi_ref. The
procedure T (plain sampling, best-of-N, worst-of-N) serves the max / min of N draws; ties count
one half. Two estimators of W_r(T(pi) > T(pi_ref) | x):

- "unbiased" (the default): the U-statistic that averages the comparison over every pair of
  N-subsets drawn without replacement, one from each side. Its expectation is exactly the
  population win rate, because N distinct samples of one side are N independent draws. It is
  computed in closed form: the max of a uniformly random N-subset of n sorted values is the j-th
  smallest (j = 1..n) with probability C(j-1, N-1) / C(n, N), and the min with C(n-j, N-1) / C(n, N).
  It needs n >= N samples per side.
- "plugin": T applied to each side's empirical distribution, i.e. N draws WITH replacement. It is
  biased towards 1/2 (a repeated draw adds no information); the size depends on the distributions:
  with 8 samples per side, best-of-4 of a Bernoulli(0.2) reward against a constant loses 3.7
  points, worst-of-4 of density 2u against Uniform(0, 1) 2.5 points (tests/evaluation/test_win_rates.py).
  Kept for comparison with older results.

For N = 1 both coincide. Intervals come from a bootstrap over prompts, the unit of independence.

Soft best-of-N (procedure "soft_bon", temperature lam) serves response i of its N draws with
probability softmax(s / lam)_i, s the selection scores (the rewards themselves unless given: pass
calibrated rewards to select on C as the analytic tool does). Its unbiased estimator is the same
U-statistic: the kernel, averaged over the selection's randomness, is sum_ik p_i q_k H(a_i, b_k),
so W = sum_ik w^a_i w^b_k H(a_i, b_k) with w_i = P(sample i is served | a uniformly random
N-subset). By the Gumbel-max form (serve argmax s_j + lam G_j),

    w_i = (N / n) int p(z) e_{N-1}({K(z + (s_i - s_j) / lam)}_{j != i}) dz / C(n - 1, N - 1),

K(z) = exp(-e^-z) the Gumbel CDF, p = K', e_k the elementary symmetric polynomial (a stable
recursion of sums of positive terms). The z integral is Gauss-Legendre on [-5, 40], beyond which
p < 1e-17.

Selecting on one reward and judging with another (a learned reward serves best-of-N; a second
scorer judges what it served): pass `selection` = (policy, reference) selection scores. Every
procedure then serves by the selection scores and compares the judged ones. For bon and won the
served rank weights attach to the samples sorted by selection (ties broken by judged value), so
the estimator stays the same U-statistic.
"""

from __future__ import annotations

import dataclasses
import statistics
import math

import numpy as np

from iapo_jax.theory.settings import PROCEDURES

_Z_EDGES = np.linspace(-5.0, 40.0, 46)  # unit panels of 16 Gauss-Legendre nodes
_ZX, _ZW = np.polynomial.legendre.leggauss(16)
_Z = (_Z_EDGES[:-1, None] + 0.5 * (1.0 + _ZX[None, :])).ravel()
_P_Z = np.tile(0.5 * _ZW, _Z_EDGES.size - 1) * np.exp(-_Z - np.exp(-_Z))  # weights times p(z)
ESTIMATORS = ("unbiased", "plugin")


@dataclasses.dataclass(frozen=True)
class WinRate:
    procedure: str
    n: int
    win_rate: float
    ci_low: float
    ci_high: float
    num_prompts: int
    estimator: str = "unbiased"  # recorded with the number: the two differ for N > 1
    lam: float | None = None  # soft_bon's selection temperature

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_lam(lam) -> float:
    """soft_bon's temperature as a float; raises ValueError naming the problem and the fix."""
    number = isinstance(lam, (int, float, np.floating)) and not isinstance(lam, bool)
    if not number or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"soft best-of-N needs a finite selection temperature lam > 0, got {lam!r}; "
                         "e.g. lam=0.1 on a calibrated reward (lam -> 0 is best-of-N)")
    return float(lam)


def _check(procedure: str, n: int, estimator: str, lam=None) -> None:
    if procedure not in PROCEDURES:
        raise ValueError(f"unknown procedure {procedure!r}; choose one of {PROCEDURES}")
    if procedure == "soft_bon":
        check_lam(lam)
        if estimator != "unbiased":
            raise ValueError("soft_bon has only the unbiased estimator; use estimator='unbiased'")
    elif lam is not None:
        raise ValueError(f"lam is soft_bon's selection temperature; leave it unset for {procedure}")
    if int(n) < 1:
        raise ValueError(f"N must be at least 1 (got {n}); use N=1 for plain sampling")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


def _served_rank_counts(num_samples: int, procedure: str, n: int) -> tuple[np.ndarray, int]:
    """(c_j, C): of the C = C(num_samples, n) n-subsets, c_j have the j-th smallest sample as
    their max (bon) / min (won); plain sampling is c_j = 1 of C = num_samples."""
    if procedure == "sampling" or n == 1:
        return np.ones(num_samples, dtype=object), num_samples
    if num_samples < n:
        raise ValueError(
            f"the unbiased {procedure} win rate at N={n} needs at least N samples per prompt on each "
            f"side, got {num_samples}; draw more samples, lower N, or pass estimator='plugin' "
            "(biased towards 1/2)")
    j = np.arange(1, num_samples + 1)
    ranks = j - 1 if procedure == "bon" else num_samples - j  # samples below / above the j-th
    return np.array([math.comb(int(r), n - 1) for r in ranks], dtype=object), math.comb(num_samples, n)


def served_rank_weights(num_samples: int, procedure: str, n: int) -> np.ndarray:
    """P(the served response is the j-th smallest of `num_samples` sorted ones), j = 1..num_samples,
    when T takes the max (bon) / min (won) of a uniformly random n-subset without replacement."""
    counts, total = _served_rank_counts(num_samples, procedure, n)
    return np.array([c / total for c in counts], np.float64)  # exact integer ratios


def soft_served_weights(selection: np.ndarray, n: int, lam: float) -> np.ndarray:
    """[P, m] -> [P, m]: P(sample j is served) when soft best-of-n (temperature lam, on these
    selection scores) runs on a uniformly random n-subset of the m samples, drawn without
    replacement (see the module docstring)."""
    s = np.asarray(selection, np.float64)
    p_rows, m = s.shape
    if m < n:
        raise ValueError(
            f"the unbiased soft_bon win rate at N={n} needs at least N samples per prompt on each "
            f"side, got {m}; draw more samples or lower N")
    if n == 1:
        return np.full(s.shape, 1.0 / m)
    out = np.empty(s.shape)
    for r in range(p_rows):
        # K[i, q, j] = K(z_q + (s_i - s_j) / lam), with j = i removed by a zero (e_k ignores it)
        gap = (s[r][:, None] - s[r][None, :]) / lam
        with np.errstate(over="ignore"):  # exp(-inf) = 0: j far above i
            k = np.exp(-np.exp(-(_Z[None, :, None] + gap[:, None, :])))
        k[np.arange(m), :, np.arange(m)] = 0.0
        e = np.zeros((m, _Z.size, n))
        e[..., 0] = 1.0
        for j in range(m):  # e_k <- e_k + K_j e_{k-1}, top degree first
            e[..., 1:] = e[..., 1:] + k[..., j, None] * e[..., :-1]
        out[r] = (n / m) * (e[..., n - 1] @ _P_Z) / math.comb(m - 1, n - 1)
    return out


def pool_calibration(scores, pool_scores) -> np.ndarray:
    """Mid-rank of each score among its prompt's pool: [P, k] against [P, m] -> [P, k] in [0, 1]."""
    x, pool = np.asarray(scores, np.float64), np.sort(np.asarray(pool_scores, np.float64), axis=1)
    below = np.stack([np.searchsorted(p, r, side="left") for p, r in zip(pool, x)])
    upto = np.stack([np.searchsorted(p, r, side="right") for p, r in zip(pool, x)])
    return (below + upto) / (2.0 * pool.shape[1])


def _soft_bon(a, b, n: int, lam: float, sel_a, sel_b) -> np.ndarray:
    wa = soft_served_weights(a if sel_a is None else sel_a, n, lam)
    wb = soft_served_weights(b if sel_b is None else sel_b, n, lam)
    twice_h = 2.0 * (a[:, :, None] > b[:, None, :]) + (a[:, :, None] == b[:, None, :])
    return np.einsum("pj,pjk,pk->p", wa, twice_h, wb) / 2.0


def _served_pmf(values: np.ndarray, support: np.ndarray, procedure: str, n: int) -> np.ndarray:
    """Plug-in: P(served reward == support[j]) for the max / min of n draws with replacement."""
    cdf = np.searchsorted(np.sort(values), support, side="right") / len(values)
    prev = np.concatenate([[0.0], cdf[:-1]])
    if procedure == "won":
        # P(min >= v_j) - P(min >= v_{j+1}), with P(min >= v_j) = (1 - F(v_{j-1}))^n.
        surv = (1.0 - prev) ** n
        return surv - np.concatenate([surv[1:], [0.0]])
    k = 1 if procedure == "sampling" else n
    return cdf**k - prev**k


def _plugin(a: np.ndarray, b: np.ndarray, procedure: str, n: int) -> np.ndarray:
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        support = np.unique(np.concatenate([a[i], b[i]]))
        pa = _served_pmf(a[i], support, procedure, n)
        pb = _served_pmf(b[i], support, procedure, n)
        below_b = np.concatenate([[0.0], np.cumsum(pb)[:-1]])
        out[i] = float(np.sum(pa * (below_b + 0.5 * pb)))
    return out


def _sort_by(values: np.ndarray, key: np.ndarray | None) -> np.ndarray:
    """values sorted along axis 1 by key (then by value, so ties in the key are broken the same
    way whatever the input order); by value when key is None."""
    if key is None:
        return np.sort(values, axis=1)
    order = np.lexsort((values, key), axis=1)
    return np.take_along_axis(values, order, axis=1)


def _unbiased(a: np.ndarray, b: np.ndarray, procedure: str, n: int, sel_a=None, sel_b=None) -> np.ndarray:
    ca, total_a = _served_rank_counts(a.shape[1], procedure, n)
    cb, total_b = _served_rank_counts(b.shape[1], procedure, n)
    # With integer subset counts and 2h in {0, 1, 2}, every partial sum is an integer; below 2^53
    # float64 adds them exactly and the one division rounds once, so a policy against itself
    # gives exactly 1/2. Larger counts fall back to probabilities (error ~1e-16).
    denom = 2 * total_a * total_b
    if denom < 2**53:
        wa, wb, scale = ca.astype(np.float64), cb.astype(np.float64), float(denom)
    else:
        wa = np.array([c / total_a for c in ca], np.float64)
        wb = np.array([c / total_b for c in cb], np.float64)
        scale = 2.0
    a, b = _sort_by(a, sel_a), _sort_by(b, sel_b)
    # Weights attach to sorted positions, so tied values simply share their mass: the comparison
    # below depends only on the values (with a selection key, on the values in its order). Chunks
    # bound the [rows, n_a, n_b] comparison array.
    rows = max(1, (1 << 22) // max(1, a.shape[1] * b.shape[1]))
    out = np.empty(a.shape[0])
    for s in range(0, a.shape[0], rows):
        x, y = a[s:s + rows, :, None], b[s:s + rows, None, :]
        twice_h = 2.0 * (x > y) + (x == y)
        out[s:s + rows] = np.einsum("j,pjk,k->p", wa, twice_h, wb) / scale
    return out


def per_prompt_win_rates(policy_scores, reference_scores, procedure: str = "sampling", n: int = 1,
                         estimator: str = "unbiased", *, lam: float | None = None, selection=None):
    """W_r(T(pi) > T(pi_ref) | x) for each prompt; scores are [P, n_a] and [P, n_b] arrays.

    selection = (policy, reference) arrays shaped like the scores that the procedure selects on
    (default: the scores themselves); soft_bon: lam is its temperature."""
    _check(procedure, n, estimator, lam)
    n = int(n)
    a = np.asarray(policy_scores, dtype=np.float64)
    b = np.asarray(reference_scores, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"scores must be [prompts, samples] with the same number of prompts; got {a.shape} "
            f"and {b.shape}"
        )
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("scores contain NaN; check the reward function's output")
    sel_a, sel_b = (None, None) if selection is None else (np.asarray(x, np.float64) for x in selection)
    for x, like in ((sel_a, a), (sel_b, b)):
        if x is not None and (x.shape != like.shape or not np.all(np.isfinite(x))):
            raise ValueError(f"selection scores must be finite and shaped like the scores {like.shape}")
    if procedure == "soft_bon":
        return _soft_bon(a, b, n, check_lam(lam), sel_a, sel_b)
    if estimator == "unbiased":
        return _unbiased(a, b, procedure, n, sel_a, sel_b)
    if selection is not None:
        raise ValueError("selection scores need the unbiased estimator; use estimator='unbiased'")
    return _plugin(a, b, procedure, n)


def inference_time_win_rate(policy_scores, reference_scores, procedure="sampling", n=1,
                            estimator: str = "unbiased", *, lam=None, selection=None) -> float:
    return float(np.mean(per_prompt_win_rates(policy_scores, reference_scores, procedure, n, estimator,
                                              lam=lam, selection=selection)))


def percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_win_rate(
    policy_scores,
    reference_scores,
    procedure: str = "sampling",
    n: int = 1,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    estimator: str = "unbiased",
    *,
    lam: float | None = None,
    selection=None,
) -> WinRate:
    """Win rate with a percentile bootstrap interval over prompts (fixed seed: reproducible)."""
    per_prompt = per_prompt_win_rates(policy_scores, reference_scores, procedure, n, estimator,
                                      lam=lam, selection=selection)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_prompt), size=(num_resamples, len(per_prompt)))
    lo, hi = percentile_interval(per_prompt[idx].mean(axis=1), confidence)
    return WinRate(procedure, int(n), float(per_prompt.mean()), lo, hi, len(per_prompt), estimator,
                   None if lam is None else float(lam))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean over prompts of a - b, with a percentile bootstrap interval over prompts.

    se: the standard deviation of the bootstrap means (the difference's standard error).
    minimum_detectable: the smallest true difference a two-sided test at the interval's level
      detects with 80% power, (z_{1 - alpha/2} + z_{0.8}) * se (2.80 se at 95%)."""

    difference: float
    ci_low: float
    ci_high: float
    num_prompts: int
    se: float = float("nan")
    minimum_detectable: float = float("nan")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def minimum_detectable_difference(se: float, confidence: float = 0.95, power: float = 0.8) -> float:
    """(z_{1 - alpha/2} + z_power) * se: the true difference a two-sided test at `confidence`
    finds with probability `power` (normal approximation)."""
    z = statistics.NormalDist().inv_cdf
    return float((z(0.5 + confidence / 2.0) + z(power)) * se)


def paired_bootstrap_difference(per_prompt_a, per_prompt_b, num_resamples: int = 2000,
                                confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """Difference of two methods' per-prompt values (e.g. win rates) on the same prompts.

    Prompts are resampled jointly: both methods keep the same prompts in every resample, so the
    prompt-to-prompt variation they share cancels, and the interval is much narrower than the one
    two independent intervals would imply.
    """
    a = np.asarray(per_prompt_a, np.float64)
    b = np.asarray(per_prompt_b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two 1-d arrays of the same prompts (at least 2), got shapes {a.shape} "
                         f"and {b.shape}; pass per_prompt_win_rates(...) of each method")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("per-prompt values contain NaN; check the inputs")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(num_resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = percentile_interval(means, confidence)
    se = float(means.std(ddof=1))
    return PairedDifference(float(d.mean()), lo, hi, len(d), se,
                            minimum_detectable_difference(se, confidence))
