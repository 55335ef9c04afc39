"""The 'optimal' CTRL transform: the analytic tool's exact optimum log f*(u), tabulated and
interpolated, checked against the solver it comes from and, in the exact testbed, against the
optimum of the trainer's own objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.alignment.ctrl_config import CTRLConfig
from iapo_jax.rewards.transforms import (
    calibrated_transform,
    check_optimal_procedure,
    get_transform,
    optimal_table,
)
from iapo_jax.theory.analysis import analyse_density
from iapo_jax.theory.densities import density_from_log_tilt
from iapo_jax.theory.quadrature import interpolate, make_grid
from iapo_jax.theory.soft_bon import soft_bon_grid
from iapo_jax.theory.win_rates import inference_win_rate, kl_divergence

# (procedure, N, lam): solved at a fixed solver beta (one fixed point, no search for a KL)
SETTINGS = [("bon", 4, None), ("won", 4, None), ("soft_bon", 4, 0.2)]
BETA = 0.1


@pytest.mark.parametrize("procedure, n, lam", SETTINGS)
def test_jitted_transform_is_the_solvers_log_density(procedure, n, lam):
    table = optimal_table(procedure, n, beta=BETA, lam=lam)
    _, d = analyse_density(procedure, n, "optimal", beta=BETA, lam=lam)
    u = np.random.default_rng(0).random(257)
    got = np.asarray(jax.jit(get_transform("optimal", table=table))(jnp.asarray(u, jnp.float32)))
    top = interpolate(d.grid, d.log_f, [1.0])[0]  # the optimum's log f is largest at u = 1
    want = 1.0 + (interpolate(d.grid, d.log_f, u) - top) / table.log_f_range
    # float32 inputs move u by up to 6e-8; the slope of phi is at most a few units
    assert np.max(np.abs(got - want)) < 2e-5
    assert got.min() >= 0.0 and got.max() <= 1.0
    if procedure != "soft_bon":  # BoN's and WoN's optimal tilts increase in u (soft-BoN's need not)
        assert np.all(np.diff(got[np.argsort(u)]) >= -1e-6)


@pytest.mark.parametrize("procedure, n, lam", SETTINGS)
def test_tilting_by_the_table_reproduces_the_optimum(procedure, n, lam):
    """pi_ref exp(phi / beta) at beta = 1 / log_f_range is the solver's optimum: same KL and win rate."""
    table = optimal_table(procedure, n, beta=BETA, lam=lam)
    reference, _ = analyse_density(procedure, n, "optimal", beta=BETA, lam=lam)
    grid = make_grid() if lam is None else soft_bon_grid(make_grid(), lam)
    d = density_from_log_tilt(grid, np.interp(grid.u, table.u, table.phi) * table.log_f_range)
    assert kl_divergence(d) == pytest.approx(table.kl, abs=1e-4)
    assert inference_win_rate(d, procedure, n, lam) == pytest.approx(table.win_rate, abs=1e-5)
    assert table.win_rate == pytest.approx(reference.win_rate, abs=1e-12)


def test_calibrated_optimal_transform_looks_scores_up_in_the_pool():
    table = optimal_table("bon", 4, kl=1.0)
    fn = jax.jit(calibrated_transform("optimal", table=table))
    pool = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
    scores = jnp.asarray([[-1.0, 1.5, 9.0]])  # mid-ranks 0, 1/2, 1
    got = np.asarray(fn(scores, pool))[0]
    assert got == pytest.approx(np.interp([0.0, 0.5, 1.0], table.u, table.phi), abs=1e-6)
    assert got[0] == pytest.approx(0.0, abs=1e-6) and got[2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: optimal_table("pruned_bon", 4, kl=1.0), "needs the analytic tool's solver"),
        (lambda: check_optimal_procedure("cd"), "not procedure 'cd'"),
        (lambda: get_transform("optimal"), "needs its table"),
        (lambda: get_transform("exp", 2.0, table=optimal_table("bon", 4, kl=1.0)), "takes no table"),
        (lambda: optimal_table("soft_bon", 4, kl=1.0), "soft_bon needs its selection temperature"),
        (lambda: optimal_table("soft_bon", 4, kl=1.0, lam=-0.1), "lam > 0"),
        (lambda: CTRLConfig(transform="optimal", procedure="soft_bon").validate(), "lam > 0"),
        (lambda: CTRLConfig(transform="identity", procedure="soft_bon", lam=math.nan).validate(), "lam > 0"),
        (lambda: CTRLConfig(transform="identity", procedure="soft_bon", lam=math.inf).validate(), "lam > 0"),
        (lambda: CTRLConfig(transform="identity", procedure="soft_bon", lam=0.0).validate(), "lam > 0"),
        (lambda: CTRLConfig(transform="optimal", procedure="soft_bon", lam=1e-4).validate(), "range"),
        (lambda: CTRLConfig(transform="exp", procedure="bon", lam=0.1).validate(), "leave it unset"),
        (lambda: CTRLConfig(transform="exp", optimal_kl=0.5).validate(), "only with transform=optimal"),
        (lambda: CTRLConfig(transform="optimal", optimal_kl=-1.0).validate(), "positive KL"),
    ],
)
def test_bad_input_is_one_clear_error_before_any_solve(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.slow
def test_ctrl_on_the_optimal_transform_reaches_its_exact_optimum():
    """The real trainer on the tabulated optimum for best-of-4 at KL 0.5 (measured: W 0.8702 vs
    0.8715, KL 0.498 vs 0.500; 30-60 s on 2 cores)."""
    from iapo_jax.testbed import exact
    from iapo_jax.testbed import run as testbed_run
    from iapo_jax.testbed.setting import build_setting, spec_for

    setting = build_setting(spec_for("single"))
    ref_logp = exact.response_log_probs(setting.reference, setting)
    pool = testbed_run.reference_pool(setting, 512, 0)
    settings = testbed_run.RunSettings(steps=400, eval_every=400)
    record = testbed_run.run_case(setting, "optimal", 0.5, "rloo", settings, pool=pool,
                                  ref_logp=ref_logp).record
    assert abs(record["win_rate_error"]) <= 0.01, record
    assert abs(record["kl_relative_error"]) <= 0.10, record
