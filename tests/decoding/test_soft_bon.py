"""Soft best-of-N on a calibrated reward (iapo_jax.theory.soft_bon) against things it does not use.

Expected values come from outside the tool: the two-draw closed form (the served density of soft
best-of-2 is 2 f(u) int f(v) sigmoid((u - v)/lam) dv, integrated by scipy), Monte Carlo of the
procedure itself with a fixed seed and a stated tolerance, and the procedure's two limits (best-of-N
as lam -> 0, plain sampling as lam -> inf) computed by the BoN / sampling code.
"""

import functools
import json
import math

import numpy as np
import pytest
from scipy import integrate, special

from iapo_jax.commands.theory import TheoryConfig, run
from iapo_jax.theory import soft_bon
from iapo_jax.theory.analysis import analyse, analyse_density
from iapo_jax.theory.densities import density_from_log_tilt
from iapo_jax.theory.optimum import regularised_objective
from iapo_jax.theory.quadrature import interpolate, make_grid
from iapo_jax.theory.tilts import log_tilt
from iapo_jax.theory.win_rates import bon_win_rate, served_cdf, standard_win_rate

A = 2.0  # the test policy: identity tilt f(u) = A e^(A u) / (e^A - 1), exact inverse CDF below


def policy(lam):
    grid = soft_bon.soft_bon_grid(make_grid(), lam)
    return density_from_log_tilt(grid, log_tilt(grid, "identity", math.log(1.0 / A)))


def f_exact(u):
    return A * np.exp(A * u) / math.expm1(A)


def draw_policy(rng, shape):
    return np.log1p(rng.random(shape) * math.expm1(A)) / A


def soft_select(rng, u, lam):
    """Serves column i of each row with probability softmax(u / lam)_i."""
    logits = u / lam - np.max(u / lam, axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    pick = (rng.random((u.shape[0], 1)) < np.cumsum(p, axis=1)).argmax(axis=1)
    return u[np.arange(u.shape[0]), pick]


@pytest.mark.parametrize("lam", [0.05, 0.3])
def test_soft_best_of_two_matches_the_two_draw_closed_form(lam):
    d = policy(lam)

    def served(u, dens):  # 2 f(u) int_0^1 f(v) sigmoid((u - v) / lam) dv
        return 2 * dens(u) * integrate.quad(lambda v: dens(v) * special.expit((u - v) / lam), 0, 1,
                                            epsabs=1e-13)[0]

    def ref_cdf(u):
        return integrate.quad(lambda x: served(x, lambda v: 1.0), 0, u, epsabs=1e-13)[0]

    win = integrate.quad(lambda u: served(u, f_exact) * ref_cdf(u), 0, 1, epsabs=1e-11, limit=200)[0]
    assert soft_bon.win_rate(d, 2, lam) == pytest.approx(win, abs=1e-8)
    at = [0.2, 0.5, 0.9]
    cdf = interpolate(d.grid, soft_bon.served_cdf(d, 2, lam)[0], at)
    for u, c in zip(at, cdf):
        assert c == pytest.approx(integrate.quad(lambda x: served(x, f_exact), 0, u)[0], abs=1e-6)


@pytest.mark.parametrize("lam", [0.05, 0.3])
def test_served_law_and_win_rate_agree_with_monte_carlo(lam):
    n, draws = 4, 200_000
    rng = np.random.default_rng(1234)
    d = policy(lam)
    pi = soft_select(rng, draw_policy(rng, (draws, n)), lam)
    ref = soft_select(rng, rng.random((draws, n)), lam)
    # 4.5 standard errors: a false alarm about once in 150,000 runs
    wins = pi > ref
    assert soft_bon.win_rate(d, n, lam) == pytest.approx(wins.mean(), abs=4.5 * wins.std() / math.sqrt(draws))
    cdf, _ = soft_bon.served_cdf(d, n, lam)
    at = np.array([0.3, 0.6, 0.8, 0.95])
    for sample, dens in ((pi, d), (ref, None)):
        closed = interpolate(d.grid, cdf if dens is d else soft_bon.reference_cdf(d.grid, n, lam), at)
        empirical = (sample[:, None] <= at).mean(axis=0)
        se = np.sqrt(closed * (1 - closed) / draws)
        assert np.all(np.abs(closed - empirical) <= 4.5 * se + 1e-12)
    g = soft_bon.served_density(d, n, lam)
    assert np.dot(d.grid.weights, g) == pytest.approx(1.0, abs=1e-12)


def test_small_lam_is_best_of_n_and_large_lam_is_sampling():
    n = 4
    gaps = []
    for lam in (0.01, 0.005):
        d = policy(lam)
        gaps.append(abs(soft_bon.win_rate(d, n, lam) - bon_win_rate(d, n)))
        cdf_bon, _ = served_cdf(d, "bon", n)
        assert np.max(np.abs(soft_bon.served_cdf(d, n, lam)[0] - cdf_bon)) < 5e-3
    assert gaps[1] < 3e-4  # measured 2.3e-4
    assert 3.0 < gaps[0] / gaps[1] < 5.0  # the gap shrinks as lam^2
    far = []
    for lam in (1e3, 1e4):
        d = policy(lam)
        far.append(abs(soft_bon.win_rate(d, n, lam) - standard_win_rate(d)))
        assert np.max(np.abs(soft_bon.served_cdf(d, n, lam)[0] - d.cdf)) < 1e-3
    assert far[1] < 1e-6 and 8.0 < far[0] / far[1] < 12.0  # and as 1 / lam at the other end


def test_stationarity_reward_is_the_derivative_of_the_win_rate():
    n, lam = 4, 0.1
    d = policy(lam)
    g = d.grid
    direction = np.cos(3.0 * g.u)  # perturb log f, renormalised: d f = f (phi - E_f phi) eps
    r = soft_bon.stationarity_reward(d, n, lam)
    predicted = np.dot(g.weights, r * d.f * (direction - np.dot(g.weights, d.f * direction)))
    eps = 1e-5
    up = density_from_log_tilt(g, d.log_f + eps * direction)
    down = density_from_log_tilt(g, d.log_f - eps * direction)
    numeric = (soft_bon.win_rate(up, n, lam) - soft_bon.win_rate(down, n, lam)) / (2 * eps)
    assert predicted == pytest.approx(numeric, rel=1e-6)


def test_optimum_beats_every_transform_and_is_a_local_maximum():
    n, lam, kl = 4, 0.1, 0.5
    best, d = analyse_density("soft_bon", n, "optimal", kl=kl, lam=lam)
    for transform in ("identity", "log", "exp"):
        other = analyse("soft_bon", n, transform, kl=best.kl, lam=lam)
        assert other.win_rate <= best.win_rate + 1e-9
        if transform == "exp":
            assert best.win_rate - other.win_rate < 5e-3  # exp with its best t comes close
    base = regularised_objective(d, "soft_bon", n, best.log_beta, lam)
    for k in (1, 2, 5):
        for sign in (1, -1):
            bumped = density_from_log_tilt(d.grid, d.log_f + sign * 1e-3 * np.sin(k * np.pi * d.grid.u))
            assert regularised_objective(bumped, "soft_bon", n, best.log_beta, lam) < base


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": 0.0}, "finite selection temperature lam > 0"),
        ({"lam": -1.0}, "finite selection temperature lam > 0"),
        ({"lam": math.nan}, "finite selection temperature lam > 0"),
        ({"lam": math.inf}, "finite selection temperature lam > 0"),
        ({"lam": 1e-4}, "outside the analytic tool's range"),
        ({}, "soft_bon needs its selection temperature"),
    ],
)
def test_bad_lam_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        analyse("soft_bon", 4, "exp", kl=1.0, **kwargs)


def test_lam_is_refused_for_other_procedures():
    with pytest.raises(ValueError, match="leave it unset for bon"):
        analyse("bon", 4, "exp", kl=1.0, lam=0.1)
    with pytest.raises(ValueError, match="does not fit procedure 'soft_bon'"):
        analyse("soft_bon", 4, "negexp", kl=1.0, lam=0.1)


def test_command_prints_the_served_law_as_json(capsys):
    out = run(TheoryConfig(procedure="soft_bon", n=4, lam=0.2, beta=0.5, transform="identity",
                           json=True, compare=False))
    printed = json.loads(capsys.readouterr().out)
    assert printed["lam"] == 0.2 and printed["procedure"] == "soft_bon"
    assert printed["win_rate"] == pytest.approx(out["win_rate"])
    law = printed["served"]
    assert law["policy_mean"] > law["reference_mean"] > 0.5  # soft selection still lifts pi_ref
    assert all(0 <= c <= 1 for c in law["policy_cdf"] + law["reference_cdf"])


@pytest.mark.parametrize("n", [2, 3])
def test_testbed_soft_bon_pmf_matches_enumeration(n):
    """The exact testbed's soft best-of-N pmf against summing over every tuple of N draws."""
    import itertools

    from iapo_jax.testbed import exact

    rng = np.random.default_rng(7)
    p, u, lam = rng.dirichlet(np.ones(6), size=2), rng.random((2, 6)), 0.1
    want = np.zeros_like(p)
    for b in range(2):
        for idx in itertools.product(range(6), repeat=n):
            pick = np.exp(u[b, list(idx)] / lam)
            for i, y in enumerate(idx):
                want[b, y] += np.prod(p[b, list(idx)]) * pick[i] / pick.sum()
    np.testing.assert_allclose(exact.soft_bon_served(p, u, n, lam), want, rtol=0, atol=1e-13)


# --- the sample estimator (iapo_jax.evaluation.win_rates) ---------------------------------------

def test_served_weights_match_enumeration_of_every_subset():
    import itertools

    from iapo_jax.evaluation.win_rates import soft_served_weights

    rng = np.random.default_rng(0)
    s, n, lam = rng.random((2, 7)), 3, 0.2
    want = np.zeros_like(s)
    subsets = list(itertools.combinations(range(7), n))
    for r in range(2):
        for subset in subsets:
            p = np.exp(s[r, list(subset)] / lam)
            want[r, list(subset)] += p / p.sum() / len(subsets)
    np.testing.assert_allclose(soft_served_weights(s, n, lam), want, rtol=0, atol=1e-13)


def test_estimator_limits_are_the_best_of_n_and_sampling_estimators():
    from iapo_jax.evaluation.win_rates import per_prompt_win_rates

    rng = np.random.default_rng(1)
    a, b = rng.random((3, 16)), rng.random((3, 16))
    np.testing.assert_allclose(per_prompt_win_rates(a, b, "soft_bon", 4, lam=1e-4),
                               per_prompt_win_rates(a, b, "bon", 4), atol=1e-12)
    np.testing.assert_allclose(per_prompt_win_rates(a, b, "soft_bon", 4, lam=1e4),
                               per_prompt_win_rates(a, b, "sampling", 1), atol=1e-4)


def test_estimator_is_unbiased_against_the_closed_form():
    """Policy f(u) = 2u against Uniform(0, 1), 8 samples a side on each of 400 prompts: the mean
    estimate sits within 4 standard errors of the closed form, and the 95% interval holds it."""
    from iapo_jax.evaluation.win_rates import bootstrap_win_rate, per_prompt_win_rates

    n, lam = 4, 0.2
    grid = soft_bon.soft_bon_grid(make_grid(), lam)
    truth = soft_bon.win_rate(density_from_log_tilt(grid, log_tilt(grid, "log", 0.0)), n, lam)
    rng = np.random.default_rng(5)
    a, b = np.sqrt(rng.random((400, 8))), rng.random((400, 8))
    per_prompt = per_prompt_win_rates(a, b, "soft_bon", n, lam=lam)
    assert per_prompt.mean() == pytest.approx(truth, abs=4 * per_prompt.std() / math.sqrt(400))
    r = bootstrap_win_rate(a, b, "soft_bon", n, lam=lam)
    assert r.ci_low <= truth <= r.ci_high and r.lam == lam


@pytest.mark.parametrize("lam", [0.0, -1.0, math.nan, math.inf, None])
def test_estimator_refuses_a_bad_lam(lam):
    from iapo_jax.evaluation.win_rates import per_prompt_win_rates

    with pytest.raises(ValueError, match="finite selection temperature lam > 0"):
        per_prompt_win_rates(np.zeros((1, 4)), np.zeros((1, 4)), "soft_bon", 2, lam=lam)


# --- the decoder (iapo_jax.decoding.best_of_n with lam) -----------------------------------------

DECODE_PROMPTS = [[5 + i % 7, 6 + i % 5, 7, 8 + i % 3] for i in range(16)]


@functools.lru_cache(maxsize=1)
def _sines():
    """One scorer object for every call: a new one would be a new static argument (a compile)."""
    import jax.numpy as jnp

    from iapo_jax.decoding.scorers import PrefixFn

    return PrefixFn(lambda ids, mask: jnp.sum(jnp.where(mask, jnp.sin(ids * 1.618 + 0.3), 0.0), -1), "sines")


def test_soft_selection_draws_from_the_softmax_of_the_scores(llama):
    """Over 16 prompts x 6 keys, how often each rank is served matches sum_rows softmax(s / lam)
    (chi-square with 3 degrees of freedom, 5-sigma bound); the responses are hard BoN's."""
    from iapo_jax.decoding.best_of_n import best_of_n

    lam, observed, expected = 0.5, np.zeros(4), np.zeros(4)
    for key in range(6):
        out = best_of_n(llama, DECODE_PROMPTS, _sines(), n=4, max_new_tokens=6, key=key, lam=lam)
        if key == 0:
            hard = best_of_n(llama, DECODE_PROMPTS, _sines(), n=4, max_new_tokens=6, key=key)
            np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(hard.tokens))
        scores = np.asarray(out.scores, np.float64)
        order = np.argsort(-scores, axis=1)  # rank 0 = best
        p = np.exp((scores - scores.max(1, keepdims=True)) / lam)
        p /= p.sum(1, keepdims=True)
        expected += np.take_along_axis(p, order, 1).sum(0)
        ranks = np.argmax(order == np.asarray(out.chosen)[:, None], axis=1)
        observed += np.bincount(ranks, minlength=4)
    chi2 = np.sum((observed - expected) ** 2 / expected)
    assert chi2 < 3 + 5 * math.sqrt(6), (observed, expected)
    assert 0 < observed[0] < observed.sum()  # soft: not always the best, yet mostly


def test_tiny_lam_is_best_of_n_and_python_scorers_select_on_the_host(llama):
    from iapo_jax.decoding.best_of_n import best_of_n

    hard = best_of_n(llama, DECODE_PROMPTS, _sines(), n=4, max_new_tokens=6, key=3)
    soft = best_of_n(llama, DECODE_PROMPTS, _sines(), n=4, max_new_tokens=6, key=3, lam=1e-6)
    np.testing.assert_array_equal(np.asarray(soft.chosen), np.asarray(hard.chosen))
    assert soft.kl_bound == pytest.approx(math.log(4))

    class Letters:  # one letter per token id, enough for a Python scorer
        eos_token_id, chat_template = 2, None

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + int(i) % 26) for i in ids)

    host = best_of_n(llama, DECODE_PROMPTS, lambda p, r: [float(s.count("a")) for s in r], n=4,
                     max_new_tokens=6, key=3, lam=1e-6, tokenizer=Letters(), chat=False)
    scores = np.asarray(host.scores)
    assert np.all(np.take_along_axis(scores, np.asarray(host.chosen)[:, None], 1)[:, 0] == scores.max(1))


def test_lam_is_traced_no_recompile(llama):
    from iapo_jax.decoding import best_of_n as bon_mod

    bon_mod.best_of_n(llama, DECODE_PROMPTS[:2], _sines(), n=3, max_new_tokens=8, key=0, lam=1.0)
    before = bon_mod.best_of_n_jit._cache_size()
    for i, lam in enumerate([0.01, 0.3, 7.0]):
        bon_mod.best_of_n(llama, DECODE_PROMPTS[:2], _sines(), n=3, max_new_tokens=8, key=i + 1, lam=lam)
    assert bon_mod.best_of_n_jit._cache_size() == before


@pytest.mark.parametrize("kwargs, match", [
    ({"lam": 0.0}, "finite selection temperature"), ({"lam": -2.0}, "finite selection temperature"),
    ({"lam": math.nan}, "finite selection temperature"), ({"lam": math.inf}, "finite selection temperature"),
    ({"lam": 0.1, "worst": True}, "best-of-N only"),
])
def test_decoder_refuses_a_bad_lam_before_compute(llama, kwargs, match, monkeypatch):
    from iapo_jax.decoding import best_of_n as bon_mod

    def boom(*a, **k):
        raise AssertionError("compute started")

    monkeypatch.setattr(bon_mod, "prepare_batch", boom)
    with pytest.raises(ValueError, match=match):
        bon_mod.best_of_n(llama, DECODE_PROMPTS[:2], _sines(), n=3, max_new_tokens=8, **kwargs)


# --- compare (iapo_jax.evaluation.comparison) ----------------------------------------------------

def test_compare_trains_for_soft_bon_and_evaluates_under_it():
    from iapo_jax.evaluation.comparison import CompareConfig, evaluate_reference
    from iapo_jax.evaluation.predicted_win_rate import predicted_win_rate

    cfg = CompareConfig(procedure="soft_bon", lam=0.1, eval_ns=(2, 4)).validate()
    ctrl = cfg.ctrl_config("ctrl")
    assert (ctrl.transform, ctrl.procedure, ctrl.lam) == ("exp", "soft_bon", 0.1)
    assert predicted_win_rate("ctrl", cfg, 0.5) == pytest.approx(
        analyse("soft_bon", 4, "exp", kl=0.5, lam=0.1).win_rate, abs=1e-9)

    class Pool:
        scores = np.random.default_rng(0).random((4, 8))

    rows = evaluate_reference(Pool, cfg)["win_rates"]
    for n in (2, 4):  # pi_ref against itself: exactly one half
        assert rows[f"soft_bon@{n}"]["win_rate"] == pytest.approx(0.5, abs=1e-12)
        assert rows[f"soft_bon@{n}"]["lam"] == 0.1


@pytest.mark.parametrize("args, match", [
    (["--procedure", "soft_bon"], "lam > 0"), (["--procedure", "soft_bon", "--lam", "-1"], "lam > 0"),
    (["--procedure", "bon", "--lam", "0.1"], "leave it unset"),
    (["--procedure", "soft_bon", "--lam", "0.1", "--sweep-kls", "0.5"], "sweeps do not cover"),
])
def test_compare_refuses_a_bad_lam_in_one_line(capsys, tmp_path, args, match):
    from iapo_jax import cli

    code = cli.main(["compare", *args, "--run-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()
