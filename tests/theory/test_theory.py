"""The analytic tool (iapo_jax.theory) against closed forms, scipy quadrature and Monte Carlo.

Every expected value here comes from outside the tool: the exact identities of algorithms.md §4,
textbook distributions (a logit tilt is a Beta law), scipy's adaptive quadrature, or sampling with a
fixed seed and a stated tolerance.
"""

import json
import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from iapo_jax.commands.theory import TheoryConfig, run
from iapo_jax.theory import analysis
from iapo_jax.theory.analysis import analyse, analyse_density
from iapo_jax.theory.densities import density_from_log_tilt
from iapo_jax.theory.optimum import regularised_objective
from iapo_jax.theory.quadrature import integrate as grid_integrate
from iapo_jax.theory.quadrature import make_grid
from iapo_jax.theory.tilts import log_tilt
from iapo_jax.theory.win_rates import (
    bon_win_rate,
    inference_win_rate,
    kl_divergence,
    served_cdf,
    standard_win_rate,
    won_win_rate,
)

GRID = make_grid()
EXACT = 1e-10  # the identities hold to rounding; the brief asks for 1e-4


def tilt(transform, beta, t=None):
    return density_from_log_tilt(GRID, log_tilt(GRID, transform, math.log(beta), t))


# --- exact identities of section 4 ------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 32])
def test_bon_policy_has_the_closed_form_kl_and_win_rate(n):
    d = tilt("log", 1.0 / (n - 1))  # f = N u^(N-1)
    assert np.allclose(d.f, n * GRID.u ** (n - 1), rtol=1e-12, atol=0)
    assert kl_divergence(d) == pytest.approx(math.log(n) - (n - 1) / n, abs=EXACT)
    assert standard_win_rate(d) == pytest.approx(n / (n + 1), abs=EXACT)
    # and the solver finds beta = 1/(N-1) back from the KL alone
    r = analyse("sampling", 1, "log", kl=math.log(n) - (n - 1) / n)
    assert r.beta == pytest.approx(1.0 / (n - 1), rel=1e-9)


@pytest.mark.parametrize("a", [0.5, 3.0, 10.0])
def test_log_tilt_gains_nothing_from_best_of_n(a):
    d = tilt("log", 1.0 / a)  # f = (a+1) u^a
    assert kl_divergence(d) == pytest.approx(math.log(a + 1) - a / (a + 1), abs=EXACT)
    for n in (1, 2, 4, 32):
        assert bon_win_rate(d, n) == pytest.approx((a + 1) / (a + 2), abs=EXACT)


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0, 300.0])
def test_identity_tilt_mean_and_kl(lam):
    d = tilt("identity", 1.0 / lam)  # f = lam e^(lam u) / (e^lam - 1)
    mean = 1.0 / -math.expm1(-lam) - 1.0 / lam
    log_z = lam + math.log(-math.expm1(-lam)) - math.log(lam)  # log((e^lam - 1) / lam)
    assert standard_win_rate(d) == pytest.approx(mean, abs=EXACT)
    assert kl_divergence(d) == pytest.approx(lam * mean - log_z, abs=EXACT)


@pytest.mark.parametrize("n,m", [(2, 3), (4, 4), (8, 4)])
def test_bon_of_bon_is_bon_of_the_product(n, m):
    d = tilt("log", 1.0 / (m - 1))  # BoN_m(pi_ref)
    cdf, sf = served_cdf(d, "bon", n)
    assert np.max(np.abs(cdf - GRID.u ** (n * m))) < 1e-12
    assert np.max(np.abs(sf - -np.expm1(n * m * GRID.log_u))) < 1e-12
    # its standard win rate, E[u] = int (1 - CDF), is that of BoN_{N m}
    assert grid_integrate(GRID, sf) == pytest.approx(n * m / (n * m + 1), abs=EXACT)


@pytest.mark.parametrize(
    "transform,beta,t", [("exp", 0.5, 3.0), ("negexp", 0.05, 8.0), ("identity", 0.2, None)]
)
def test_one_draw_procedures_are_plain_sampling(transform, beta, t):
    d = tilt(transform, beta, t)
    s = standard_win_rate(d)
    assert bon_win_rate(d, 1) == pytest.approx(s, abs=EXACT)
    assert won_win_rate(d, 1) == pytest.approx(s, abs=EXACT)
    assert inference_win_rate(d, "sampling", 1) == s


def test_optimum_for_one_draw_is_the_identity_tilt():
    for procedure in ("sampling", "bon", "won"):
        r = analyse(procedure, 1, "optimal", kl=1.0)
        ident = analyse("sampling", 1, "identity", kl=1.0)
        assert r.win_rate == pytest.approx(ident.win_rate, abs=1e-9)
        assert r.beta == pytest.approx(ident.beta, rel=1e-7)


@pytest.mark.parametrize("m,n", [(2, 2), (3, 4), (5, 8)])
def test_won_of_log_tilt_matches_binomial_sum(m, n):
    # int N (1-u)^(N-1) (1-u^m)^N du, expanded: sum_k C(N,k) (-1)^k N B(m k + 1, N)
    exact = sum(special.comb(n, k) * (-1) ** k * n * special.beta(m * k + 1, n) for k in range(n + 1))
    assert won_win_rate(tilt("log", 1.0 / (m - 1)), n) == pytest.approx(exact, abs=1e-12)


# --- against independent numerics ---------------------------------------------------------------

@pytest.mark.parametrize("a", [0.3, 0.7, 0.9])
def test_logit_tilt_is_a_beta_law(a):
    """f ∝ (u/(1-u))^a is Beta(1+a, 1-a): singular at u = 1, yet exact to 1e-9."""
    result = analyse("bon", 4, "logit", beta=1.0 / a)
    law = stats.beta(1 + a, 1 - a)
    assert result.kl == pytest.approx(-law.entropy(), abs=1e-9)
    assert result.standard_win_rate == pytest.approx(law.mean(), abs=1e-9)
    bon, _ = integrate.quad(lambda u: 4 * u**3 * (1 - law.cdf(u) ** 4), 0, 1, epsabs=1e-13, limit=200)
    assert result.win_rate == pytest.approx(bon, abs=1e-9)


def test_exp_tilt_against_scipy_quad():
    t, beta, n = 5.0, 20.0, 4
    z, _ = integrate.quad(lambda u: math.exp(math.exp(t * u) / beta), 0, 1, epsabs=1e-14)

    def f(u):
        return math.exp(math.exp(t * u) / beta) / z

    def cdf(u):
        return integrate.quad(f, 0, u, epsabs=1e-14)[0]

    kl, _ = integrate.quad(lambda u: f(u) * math.log(f(u)), 0, 1, epsabs=1e-14)
    bon, _ = integrate.quad(lambda u: n * u ** (n - 1) * (1 - cdf(u) ** n), 0, 1, epsabs=1e-12)
    won, _ = integrate.quad(lambda u: n * (1 - u) ** (n - 1) * (1 - cdf(u)) ** n, 0, 1, epsabs=1e-12)
    d = tilt("exp", beta, t)
    assert kl_divergence(d) == pytest.approx(kl, abs=1e-10)
    assert bon_win_rate(d, n) == pytest.approx(bon, abs=1e-9)
    assert won_win_rate(d, n) == pytest.approx(won, abs=1e-9)


@pytest.mark.parametrize(
    "procedure,transform,t,kl", [("bon", "exp", 12.0, 1.0), ("won", "negexp", 10.0, 0.5)]
)
def test_monte_carlo_agrees(procedure, transform, t, kl):
    """Rejection sampling from the tilt (uniform proposal) never touches the tool's quadrature."""
    n, size = 4, 400_000
    r = analyse(procedure, n, transform, kl=kl, t=t)
    rng = np.random.default_rng(0)
    u = rng.uniform(size=size)
    phi = np.exp(t * u) if transform == "exp" else -np.exp(-t * u)
    log_w = (phi - phi.max()) / r.beta  # density ratio up to a constant, <= 1
    accepted = rng.uniform(size=size) < np.exp(log_w)
    y = u[accepted]
    y = y[: len(y) // n * n].reshape(-1, n)
    # the reference's served reward has CDF u^N (best) or 1 - (1-u)^N (worst): average it exactly
    wins = y.max(axis=1) ** n if procedure == "bon" else 1 - (1 - y.min(axis=1)) ** n
    sigma = wins.std() / math.sqrt(len(wins))
    assert abs(wins.mean() - r.win_rate) < 4 * sigma, (wins.mean(), r.win_rate, sigma)
    # KL = E_pi[log_w] - log E_uniform[exp(log_w)]
    kl_mc = np.mean(log_w[accepted]) - np.log(np.mean(np.exp(log_w)))
    assert kl_mc == pytest.approx(kl, abs=0.02)


def test_stiff_cases_stay_finite_and_converged():
    """N = 32 and large t: the default grid agrees with a much finer one."""
    fine = make_grid(order=24, ratio=1.5, depth=1e-60)
    cases = [("bon", "exp", 2000.0, 2.0), ("bon", "exp", 300.0, 0.5), ("won", "negexp", 200.0, 0.3)]
    for procedure, transform, t, kl in cases:
        coarse, _ = analyse_density(procedure, 32, transform, kl=kl, t=t)
        finer, _ = analyse_density(procedure, 32, transform, kl=kl, t=t, grid=fine)
        assert all(math.isfinite(v) for v in (coarse.kl, coarse.log_beta, coarse.win_rate))
        assert 0.5 < coarse.win_rate < 1.0
        assert coarse.win_rate == pytest.approx(finer.win_rate, abs=1e-12)
        assert coarse.kl == pytest.approx(kl, abs=1e-10)


# --- the optimum and the best t -----------------------------------------------------------------

@pytest.mark.parametrize("kl", [0.5, 2.0])
def test_bon_optimum_beats_every_transform_and_exp_comes_close(kl):
    best = analyse("bon", 4, "optimal", kl=kl)
    assert best.kl == pytest.approx(kl, abs=1e-8)
    for transform in ("identity", "log", "logit", "exp"):
        other = analyse("bon", 4, transform, kl=kl)
        assert other.win_rate <= best.win_rate + 1e-9, transform
    exp = analyse("bon", 4, "exp", kl=kl)
    assert best.win_rate - exp.win_rate < 0.005  # "within a few tenths of a point"


def test_won_optimum_beats_every_transform():
    best = analyse("won", 4, "optimal", kl=0.5)
    for transform in ("identity", "log", "logit", "negexp"):
        assert analyse("won", 4, transform, kl=0.5).win_rate <= best.win_rate + 1e-9, transform


@pytest.mark.parametrize("procedure", ["bon", "won"])
def test_optimum_is_a_local_maximum_of_the_regularised_objective(procedure):
    """Smooth perturbations f -> f exp(eps h) must not raise W - beta KL (no fixed-point code used)."""
    log_beta = math.log(0.1)
    _, d = analyse_density(procedure, 4, "optimal", beta=0.1)
    base = regularised_objective(d, procedure, 4, log_beta)
    x = 2 * d.grid.u - 1
    for degree in range(1, 6):
        h = special.eval_legendre(degree, x)
        for eps in (-1e-2, -1e-3, 1e-3, 1e-2):
            moved = density_from_log_tilt(d.grid, d.log_f + eps * h)
            assert regularised_objective(moved, procedure, 4, log_beta) <= base + 1e-12


def test_bon_optimum_matches_a_brute_force_search():
    """A generic optimiser over 10 Legendre coefficients of log f can only come close from below."""
    from scipy import optimize

    beta, log_beta = 0.2, math.log(0.2)
    _, d = analyse_density("bon", 4, "optimal", beta=beta)
    ours = regularised_objective(d, "bon", 4, log_beta)
    x = 2 * GRID.u - 1
    basis = np.stack([special.eval_legendre(k, x) for k in range(1, 11)])

    def loss(c):
        return -regularised_objective(density_from_log_tilt(GRID, c @ basis), "bon", 4, log_beta)

    found = optimize.minimize(loss, np.zeros(10), method="BFGS")
    assert -found.fun <= ours + 1e-10
    assert -found.fun == pytest.approx(ours, abs=1e-4)  # measured gap 3e-5 (truncated basis)


def test_best_t_is_a_maximum_over_t():
    best = analyse("bon", 4, "exp", kl=1.0)
    for factor in (0.9, 1.1):
        assert analyse("bon", 4, "exp", kl=1.0, t=best.t * factor).win_rate < best.win_rate


def test_target_kl_is_hit_for_every_transform():
    cases = [("bon", "identity", None), ("bon", "logit", None), ("bon", "exp", 30.0),
             ("won", "negexp", 20.0), ("won", "log", None)]
    for procedure, transform, t in cases:
        for kl in (0.01, 1.0, 4.0):
            assert analyse(procedure, 4, transform, kl=kl, t=t).kl == pytest.approx(kl, abs=1e-10)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("bon", 4, "exp"), {"beta": 0.0, "t": 1.0}, "beta must be"),
        (("bon", 4, "identity"), {"beta": -1.0}, "beta must be"),
        (("bon", 4, "identity"), {"kl": 0.0}, "kl must be"),
        (("bon", 4, "identity"), {"kl": float("nan")}, "kl must be"),
        (("bon", 0, "identity"), {"kl": 1.0}, "N must be an integer >= 1"),
        (("bon", 2.5, "identity"), {"kl": 1.0}, "N must be an integer >= 1"),
        (("bon", 4, "negexp"), {"kl": 1.0}, "does not fit procedure 'bon'"),
        (("won", 4, "exp"), {"kl": 1.0}, "does not fit procedure 'won'"),
        (("sampling", 1, "exp"), {"kl": 1.0}, "does not fit procedure 'sampling'"),
        (("sampling", 4, "identity"), {"kl": 1.0}, "N must be 1"),
        (("bon", 4, "exp"), {"kl": 1.0, "t": 0.0}, "t must be"),
        (("bon", 4, "identity"), {"kl": 1.0, "t": 2.0}, "t applies only"),
        (("bon", 4, "logit"), {"beta": 0.5}, "not normalisable"),
        (("bon", 4, "identity"), {"kl": 1.0, "beta": 1.0}, "exactly one of kl"),
        (("bon", 4, "identity"), {}, "exactly one of kl"),
        (("bon", 4, "exp"), {"beta": 1.0}, "needs an explicit t"),
        (("bon", 4, "cubic"), {"kl": 1.0}, "unknown transform"),
        (("best", 4, "exp"), {"kl": 1.0}, "unknown procedure"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        analyse(*args, **kwargs)


def test_bad_input_is_rejected_before_any_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed before validating")

    monkeypatch.setattr(analysis, "best_t", boom)
    with pytest.raises(ValueError, match="--plot"):
        run(TheoryConfig(procedure="bon", kl=1.0, plot="curves.txt"))
    with pytest.raises(ValueError, match="does not fit"):
        run(TheoryConfig(procedure="won", kl=1.0, transform="exp"))


# --- the command --------------------------------------------------------------------------------

def test_command_prints_json_with_the_required_fields(capsys):
    cfg = TheoryConfig(procedure="bon", n=4, kl=1.0, transform="exp", t=17.0, json=True, compare=False)
    out = run(cfg)
    printed = json.loads(capsys.readouterr().out)
    for key in ("kl", "beta", "t", "win_rate", "standard_win_rate"):
        assert printed[key] == out[key]
    assert printed["kl"] == pytest.approx(1.0, abs=1e-10)
    assert printed["t"] == 17.0


def test_command_prints_tables_and_plots(tmp_path, capsys):
    path = tmp_path / "curves.png"
    out = run(TheoryConfig(procedure="sampling", kl=0.5, plot=path))
    text = capsys.readouterr().out
    assert "| sampling | identity |" in text and "| sampling | logit |" in text
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["transform"] for r in out["comparison"]} == {"log", "logit", "optimal"}
