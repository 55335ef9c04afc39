"""Win-rate estimators against brute-force enumeration, exact closed forms and simulations.

Populations used below (pi_ref's calibrated reward is Uniform(0, 1)): the policy has density
(a+1) u^a, CDF u^(a+1). Best-of-N on both sides gives CDFs u^((a+1)N) and u^N, so
W(BoN_N) = (a+1)N / ((a+1)N + N) = (a+1)/(a+2); worst-of-N is integrated numerically here.
"""

import itertools
import math

import numpy as np
import pytest

from iapo_jax.evaluation import (
    bootstrap_win_rate,
    inference_time_win_rate,
    paired_bootstrap_difference,
    per_prompt_win_rates,
)


def _h(x, y):
    return (x > y) + 0.5 * (x == y)


def _brute(a, b, procedure, n, subsets):
    """Average comparison over every served pair: N-subsets without replacement (the unbiased
    U-statistic) or ordered N-tuples with replacement (the plug-in)."""
    pick = {"sampling": lambda t: t[0], "bon": max, "won": min}[procedure]
    k = 1 if procedure == "sampling" else n
    draws = (lambda v: itertools.combinations(v, k)) if subsets else (lambda v: itertools.product(v, repeat=k))
    sa = [pick(t) for t in draws(a)]
    sb = [pick(t) for t in draws(b)]
    return float(np.mean([_h(x, y) for x in sa for y in sb]))


A_TIES = np.array([[0.0, 1.0, 1.0, 2.0, 1.0]])  # ties inside and across policies
B_TIES = np.array([[1.0, 0.0, 3.0, 1.0]])


@pytest.mark.parametrize("procedure,n", [("sampling", 1), ("bon", 2), ("bon", 3), ("bon", 4),
                                         ("won", 2), ("won", 4)])
def test_unbiased_estimator_equals_enumeration_of_all_subsets_with_ties(procedure, n):
    got = per_prompt_win_rates(A_TIES, B_TIES, procedure, n)[0]  # the default estimator
    assert got == pytest.approx(_brute(A_TIES[0], B_TIES[0], procedure, n, subsets=True), abs=1e-12)


@pytest.mark.parametrize("procedure,n", [("sampling", 1), ("bon", 2), ("bon", 3), ("won", 2), ("won", 4)])
def test_selecting_on_one_reward_and_judging_with_another_equals_enumeration(procedure, n):
    """Best-/worst-of-N served by a selection reward (e.g. a learned one) and judged by another:
    the estimator equals the average over every pair of N-subsets of the judged values of the
    responses the selection serves."""
    rng = np.random.default_rng(3)
    judged_a, judged_b = rng.integers(0, 3, (2, 6)).astype(float), rng.integers(0, 3, (2, 5)).astype(float)
    select_a, select_b = rng.normal(size=(2, 6)), rng.normal(size=(2, 5))
    got = per_prompt_win_rates(judged_a, judged_b, procedure, n, selection=(select_a, select_b))
    for p in range(2):
        k = 1 if procedure == "sampling" else n
        pick = np.argmax if procedure != "won" else np.argmin

        def served(judged, select):
            return [judged[list(t)][pick(select[list(t)])] for t in itertools.combinations(range(len(judged)), k)]

        sa, sb = served(judged_a[p], select_a[p]), served(judged_b[p], select_b[p])
        want = float(np.mean([_h(x, y) for x in sa for y in sb]))
        assert got[p] == pytest.approx(want, abs=1e-12)
    # selecting on the judged values themselves is the plain estimator
    same = per_prompt_win_rates(judged_a, judged_b, procedure, n, selection=(judged_a, judged_b))
    np.testing.assert_allclose(same, per_prompt_win_rates(judged_a, judged_b, procedure, n), atol=1e-12)


@pytest.mark.parametrize("procedure,n", [("sampling", 1), ("bon", 2), ("bon", 3), ("won", 3)])
def test_plugin_estimator_equals_enumeration_with_replacement(procedure, n):
    got = per_prompt_win_rates(A_TIES, B_TIES, procedure, n, estimator="plugin")[0]
    assert got == pytest.approx(_brute(A_TIES[0], B_TIES[0], procedure, n, subsets=False), abs=1e-12)


def test_unbiased_mean_is_exact_on_a_discrete_population_and_the_plugin_is_not():
    """Policy reward ~ Bernoulli(p), reference always 0.5: W(BoN_N) = 1 - (1-p)^N exactly. Both
    estimators depend on the sample only through K = number of ones, so their expectations are
    exact sums over K ~ Binomial(n, p): no simulation noise."""
    p, n_samples, N = 0.2, 8, 4
    ref = np.full((1, n_samples), 0.5)
    mean = {"unbiased": 0.0, "plugin": 0.0}
    for k in range(n_samples + 1):
        prob = math.comb(n_samples, k) * p**k * (1 - p) ** (n_samples - k)
        row = np.array([[1.0] * k + [0.0] * (n_samples - k)])
        for est in mean:
            mean[est] += prob * per_prompt_win_rates(row, ref, "bon", N, estimator=est)[0]
    truth = 1 - (1 - p) ** N
    assert mean["unbiased"] == pytest.approx(truth, abs=1e-12)
    assert mean["plugin"] < truth - 0.03  # the plug-in's known bias towards 1/2 (about -3.7 points)


def _power_law_replicates(a_pow, prompts, samples, seed):
    rng = np.random.default_rng(seed)
    policy = rng.uniform(size=(prompts, samples)) ** (1.0 / (a_pow + 1.0))  # inverse CDF of u^(a+1)
    return policy, rng.uniform(size=(prompts, samples))


def _won_closed_form(a_pow, N):
    """P(min of N policy draws > min of N reference draws) = int_0^1 N (1-u)^(N-1) (1 - u^(a+1))^N du,
    by Gauss-Legendre quadrature (exact here: the integrand is a polynomial for integer a)."""
    x, w = np.polynomial.legendre.leggauss(40)
    u, w = (x + 1) / 2, w / 2
    return float(np.sum(w * N * (1 - u) ** (N - 1) * (1 - u ** (a_pow + 1)) ** N))


def test_won_closed_form_quadrature_sanity():
    # a = 0: the policy is pi_ref, so the win rate is exactly 1/2
    assert _won_closed_form(0.0, 4) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_unbiased_estimator_mean_matches_the_population_closed_form(procedure):
    """4000 prompts x 8 samples per side, best-/worst-of-4 (seeded). The unbiased mean lies within
    3 standard errors of the closed form. The plug-in sits below it on the same data: for worst-of-4
    by about 2.5 points (> 5 standard errors); for best-of-4 on this population its bias is small
    (about 0.2 points), so the check there is on the paired gap, whose standard error is ~0.08."""
    a_pow, N, P = 1.0, 4, 4000
    truth = (a_pow + 1) / (a_pow + 2) if procedure == "bon" else _won_closed_form(a_pow, N)
    policy, ref = _power_law_replicates(a_pow, P, 8, seed=0)
    u = per_prompt_win_rates(policy, ref, procedure, N)
    plug = per_prompt_win_rates(policy, ref, procedure, N, estimator="plugin")
    se = u.std(ddof=1) / math.sqrt(P)
    assert abs(u.mean() - truth) < 3 * se, (u.mean(), truth, se)
    gap, gap_se = (plug - u).mean(), (plug - u).std(ddof=1) / math.sqrt(P)
    assert gap < -2.5 * gap_se  # plug-in pulled towards 1/2 against the unbiased estimate
    if procedure == "won":
        assert plug.mean() < truth - 5 * se and truth - plug.mean() > 0.015


def test_bon_of_reference_against_reference_is_n_over_n_plus_one():
    """Best-of-N of pi_ref vs a plain pi_ref sample wins N/(N+1) (continuous rewards)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 20_000))
    b = rng.normal(size=(1, 20_000))
    a_best = a.reshape(1, -1, 4).max(-1)  # side a serves the max of 4 fresh draws, side b plain
    assert inference_time_win_rate(a_best, b, "sampling", 1) == pytest.approx(0.8, abs=0.01)


def test_same_policy_wins_half_under_every_procedure_and_estimator():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, size=(50, 8)).astype(float)  # many ties
    for proc, n in [("sampling", 1), ("bon", 4), ("won", 4), ("bon", 8)]:
        for est in ("unbiased", "plugin"):
            assert inference_time_win_rate(x, x, proc, n, est) == pytest.approx(0.5, abs=1e-12)
    # The reference against itself is a sanity row of the reports: exactly 1/2 (integer subset
    # counts, one rounding) at the sizes the experiments use, and within 1e-15 beyond them.
    for m, n in [(8, 4), (16, 8), (32, 8), (64, 8)]:
        y = rng.normal(size=(20, m)).round(1)
        for proc in ("bon", "won"):
            got = per_prompt_win_rates(y, y, proc, n)
            if m <= 32:
                assert np.all(got == 0.5), (m, n, proc)
            np.testing.assert_allclose(got, 0.5, rtol=0, atol=1e-15)


def test_bootstrap_interval_covers_the_true_value_at_its_nominal_rate():
    """200 seeded replicates of 40 prompts x 8 samples, best-of-4: the 95% percentile interval
    must contain the population value (a+1)/(a+2) in 90-99% of them. A too narrow interval (e.g.
    resampling samples instead of prompts, or a wrong quantile) or a biased centre fails this;
    with 200 replicates the binomial sd of the coverage is 1.5 points."""
    a_pow, truth, hits = 1.0, 2.0 / 3.0, 0
    for rep in range(200):
        policy, ref = _power_law_replicates(a_pow, 40, 8, seed=1000 + rep)
        w = bootstrap_win_rate(policy, ref, "bon", 4, num_resamples=500, seed=rep)
        hits += w.ci_low <= truth <= w.ci_high
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_bootstrap_is_reproducible_with_its_seed():
    policy, ref = _power_law_replicates(1.0, 16, 8, seed=2)
    assert bootstrap_win_rate(policy, ref, "bon", 4, seed=3) == bootstrap_win_rate(policy, ref, "bon", 4, seed=3)
    # the record says which estimator made the number
    assert bootstrap_win_rate(policy, ref, "bon", 4).as_dict()["estimator"] == "unbiased"
    assert bootstrap_win_rate(policy, ref, "bon", 4, estimator="plugin").estimator == "plugin"


def test_paired_difference_of_two_methods_on_the_same_prompts():
    """Two methods that share a large prompt effect: the paired mean difference is exact, and its
    interval is far narrower than the unpaired spread and covers the true difference (0.05)."""
    rng = np.random.default_rng(4)
    prompt_effect = rng.normal(0.6, 0.15, size=200)
    a = prompt_effect + 0.05 + rng.normal(0, 0.02, size=200)
    b = prompt_effect + rng.normal(0, 0.02, size=200)
    d = paired_bootstrap_difference(a, b, seed=0)
    assert d.difference == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    assert d.ci_low < 0.05 < d.ci_high
    # the interval's half-width matches the standard error of the mean difference (sd 0.028 / sqrt 200)
    se = np.std(a - b, ddof=1) / math.sqrt(200)
    assert (d.ci_high - d.ci_low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    unpaired_width = 2 * 1.96 * math.sqrt((np.var(a) + np.var(b)) / 200)  # two independent intervals
    assert d.ci_high - d.ci_low < 0.25 * unpaired_width
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_difference(a, b[:-1])


def test_minimum_detectable_difference_is_detected_at_its_stated_power():
    """A true paired difference equal to the reported minimum detectable difference (2.80 SE at
    95%) is detected (interval excludes 0) in about 80% of simulated experiments, half of it in
    about 24% (normal theory: Phi(1.40 - 1.96) = 0.29, less the bootstrap's slightly narrow
    percentile interval); the SE is the per-prompt spread / sqrt(prompts)."""
    from iapo_jax.evaluation.win_rates import minimum_detectable_difference

    assert minimum_detectable_difference(1.0) == pytest.approx(1.95996 + 0.84162, abs=1e-4)
    rng = np.random.default_rng(11)
    prompts, sd = 48, 0.2
    mdd = minimum_detectable_difference(sd / math.sqrt(prompts))
    for true, power, tol in ((mdd, 0.80, 0.06), (mdd / 2, 0.29, 0.07)):
        detected = 0
        for i in range(400):
            d = rng.normal(true, sd, size=prompts)
            r = paired_bootstrap_difference(d, np.zeros(prompts), num_resamples=1000, seed=i)
            detected += r.ci_low > 0 or r.ci_high < 0
        assert detected / 400 == pytest.approx(power, abs=tol), (true, detected)
    r = paired_bootstrap_difference(rng.normal(0, sd, prompts), np.zeros(prompts), seed=0)
    assert r.se == pytest.approx(sd / math.sqrt(prompts), rel=0.2)
    assert r.minimum_detectable == pytest.approx(minimum_detectable_difference(r.se))


def test_method_differences_pair_every_two_methods_on_the_same_reference():
    from iapo_jax.evaluation.paired import differences_table, method_differences

    rng = np.random.default_rng(2)
    ref = rng.normal(size=(12, 8))
    scores = {"ctrl": rng.normal(0.5, 1, (12, 8)), "calibrated": rng.normal(0.2, 1, (12, 8)),
              "raw": rng.normal(size=(12, 8))}
    rows = method_differences(scores, ref, ("sampling", "bon"), (4,))
    assert [(r["a"], r["b"], r["procedure"], r["n"]) for r in rows] == [
        (a, b, p, n) for a, b in (("ctrl", "calibrated"), ("ctrl", "raw"), ("calibrated", "raw"))
        for p, n in (("sampling", 1), ("bon", 4))]
    for r in rows:
        assert r["policy"] == pytest.approx(inference_time_win_rate(scores[r["a"]], ref, r["procedure"], r["n"]))
        assert r["baseline"] == pytest.approx(inference_time_win_rate(scores[r["b"]], ref, r["procedure"], r["n"]))
        assert r["difference"] == pytest.approx(r["policy"] - r["baseline"])
        assert r["minimum_detectable"] > 0
    assert "| ctrl - calibrated | BoN_4 |" in differences_table(rows)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 1"):
        per_prompt_win_rates(np.zeros((1, 2)), np.zeros((1, 2)), "bon", 0)
    with pytest.raises(ValueError, match="unknown procedure"):
        per_prompt_win_rates(np.zeros((1, 2)), np.zeros((1, 2)), "tree", 2)
    with pytest.raises(ValueError, match="unknown estimator"):
        per_prompt_win_rates(np.zeros((1, 2)), np.zeros((1, 2)), "bon", 2, estimator="median")
    with pytest.raises(ValueError, match="NaN"):
        per_prompt_win_rates(np.array([[np.nan]]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="same number of prompts"):
        per_prompt_win_rates(np.zeros((2, 2)), np.zeros((1, 2)))
    # fewer samples than N: the unbiased estimator refuses and names the fixes
    with pytest.raises(ValueError, match=r"needs at least N samples .* got 3.*estimator='plugin'"):
        per_prompt_win_rates(np.zeros((1, 3)), np.zeros((1, 8)), "won", 4)
    assert per_prompt_win_rates(np.zeros((1, 3)), np.zeros((1, 8)), "won", 4, estimator="plugin")[0] == 0.5
