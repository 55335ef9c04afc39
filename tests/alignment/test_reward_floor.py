"""The reward floor (CTRLConfig.reward_floor_nats): what it does to the trainer's reward, how little
it moves the optimum (exactly, on the testbed), that worst-of-4 at KL 1 converges with it and not
without it, and that runs recorded before it existed resume and reproduce without it."""

import dataclasses

import numpy as np
import pytest

from iapo_jax.alignment.ctrl import CTRLTrainer, floored, reward_floor
from iapo_jax.alignment.ctrl_config import CTRLConfig
from iapo_jax.rewards.transforms import transform_top, unit_range_transform
from iapo_jax.testbed import exact
from iapo_jax.testbed import run as testbed_run
from iapo_jax.testbed.setting import build_setting, spec_for


@pytest.fixture(scope="module")
def single():
    setting = build_setting(spec_for("single"))
    ref_logp = exact.response_log_probs(setting.reference, setting)
    return setting, ref_logp, testbed_run.reference_pool(setting, 512, 0)


def test_floor_is_the_top_of_phi_minus_nats_times_beta():
    # negexp on [0, 1] tops out at Phi(1) = 1; log with eps clips at 1 - eps: log(1 - eps).
    assert transform_top(unit_range_transform("negexp", 16.0)) == pytest.approx(1.0, abs=1e-6)
    assert transform_top(unit_range_transform("log", None, 0.01), 0.01) == pytest.approx(np.log(0.99), abs=1e-6)
    phi = np.array([0.0, 0.5, 0.99, 1.0], np.float32)
    assert reward_floor(1.0, 0.02, 15.0) == pytest.approx(0.7)
    assert reward_floor(1.0, 0.02, None) is None and reward_floor(None, 0.02, 15.0) is None  # no floor; raw
    np.testing.assert_allclose(floored(phi, reward_floor(1.0, 0.02, 15.0)), [0.7, 0.7, 0.99, 1.0], rtol=1e-6)
    assert floored(phi, None) is phi


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_floor_is_rejected(bad):
    with pytest.raises(ValueError, match="reward_floor_nats must be a positive number of nats"):
        CTRLConfig(reward_floor_nats=bad).validate()


def test_trainer_floors_its_reward_at_the_current_beta(single):
    """The trainer's task reward is max(Phi(C_hat), 1 - nats * beta), recomputed when the KL
    controller moves beta; None leaves Phi as it is."""
    setting, ref_logp, pool = single
    case = testbed_run.prepare_case(setting, "negexp", 1.0, "rloo", pool=pool, ref_logp=ref_logp)
    trainer = case.trainer
    prompts, table = list(setting.prompts), setting.reward_table.astype(np.float32)
    u, shaped = trainer.shaped_rewards(prompts, table)
    phi = np.asarray(unit_range_transform("negexp", case.t)(u))
    np.testing.assert_allclose(shaped, np.maximum(phi, 1.0 - 15.0 * case.beta), rtol=1e-6)
    assert 0.3 < np.mean(shaped == np.float32(1.0 - 15.0 * case.beta)) < 0.7  # the bottom ~half
    trainer.beta = 1e-3
    np.testing.assert_allclose(trainer.shaped_rewards(prompts, table)[1], np.maximum(phi, 1.0 - 15e-3), rtol=1e-6)
    off = CTRLTrainer(dataclasses.replace(trainer.cfg, reward_floor_nats=None), setting.new_policy(),
                      setting.reference, setting.tokenizer, setting.reward, pool, prompts)
    np.testing.assert_allclose(off.shaped_rewards(prompts, table)[1], phi, rtol=1e-6)


def test_predictive_controller_keeps_the_floor_where_the_starting_beta_puts_it(single):
    """A falling beta must not raise the floor over the batch (it floored 80-90% of a SmolLM2 batch
    under the proportional controller); a rising one lowers it as before."""
    setting, ref_logp, pool = single
    case = testbed_run.prepare_case(setting, "negexp", 1.0, "rloo", pool=pool, ref_logp=ref_logp)
    cfg = dataclasses.replace(case.trainer.cfg, target_kl=1.0, kl_controller="predictive")
    trainer = CTRLTrainer(cfg, setting.new_policy(), setting.reference, setting.tokenizer, setting.reward,
                          pool, list(setting.prompts))
    start = trainer.floor_level()
    assert start == pytest.approx(1.0 - 15.0 * cfg.beta)
    trainer.beta = cfg.beta / 100
    assert trainer.floor_level() == start
    trainer.beta = cfg.beta * 2
    assert trainer.floor_level() == pytest.approx(1.0 - 30.0 * cfg.beta)


@pytest.mark.parametrize("transform,kl", [("negexp", 1.0), ("negexp", 0.5), ("log", 1.0)])
def test_floor_moves_the_optimum_by_less_than_1e4(single, transform, kl):
    """Solved exactly: at 15 nats the floored optimum's KL and worst-/best-of-4 win rate equal the
    unfloored optimum's to 1e-4. At 2 nats the same check fails, so it can."""
    setting, ref_logp, pool = single
    case = testbed_run.prepare_case(setting, transform, kl, "rloo", pool=pool, ref_logp=ref_logp)
    table = setting.reward_table

    def optimum(phi):
        return testbed_run.evaluate(exact.tilted(ref_logp, phi, case.beta), ref_logp, table, case.procedure, case.n)

    floored_opt, unfloored_opt = optimum(case.phi), optimum(case.unfloored_phi)
    assert floored_opt["kl"] == pytest.approx(kl, rel=1e-6)
    assert abs(floored_opt["kl"] - unfloored_opt["kl"]) < 1e-4
    assert abs(floored_opt["win_rate"] - unfloored_opt["win_rate"]) < 1e-4
    coarse = optimum(case.floor(case.unfloored_phi, case.beta * 2 / 15))  # a 2-nat floor
    assert abs(coarse["kl"] - unfloored_opt["kl"]) > 1e-3


@pytest.mark.slow
def test_worst_of_4_at_kl_1_reaches_its_optimum_with_the_floor_and_collapses_without(single):
    """-exp for worst-of-4 at KL 1 (beta 2.8e-5: Phi/beta spans 35,000 nats). Without the floor even
    the exact expected gradient overshoots past KL 3 within 100 steps; with it the real sampled
    trainer (800 steps x 256 rollouts per prompt, RLOO) lands within the testbed's target."""
    from iapo_jax.testbed import expected_gradient

    setting, ref_logp, pool = single
    off = testbed_run.prepare_case(setting, "negexp", 1.0, "rloo", testbed_run.RunSettings(reward_floor_nats=None),
                                   pool=pool, ref_logp=ref_logp)
    points = expected_gradient.train_on_expected_gradient(off.trainer, setting, off.phi, ref_logp, 100, every=100)
    assert points[-1]["kl"] > 3.0, points

    run = testbed_run.settings_for("single", "negexp", eval_every=800)
    record = testbed_run.run_case(setting, "negexp", 1.0, "rloo", run, pool=pool, ref_logp=ref_logp).record
    assert record["reward_floor_nats"] == 15.0
    assert abs(record["win_rate_error"]) <= 0.01, record
    assert abs(record["kl_relative_error"]) <= 0.10, record
    assert abs(record["unfloored_optimum_win_rate"] - record["optimum_win_rate"]) < 1e-4


def test_records_from_before_the_floor_resume_and_reproduce_without_it():
    from iapo_jax.commands import load_job
    from iapo_jax.commands.configs import config_from_mapping, recorded_config

    for name in ("ctrl", "compare", "quickstart", "testbed"):
        job = load_job(name)
        old = config_from_mapping(job.config_type, recorded_config(job.spec, {"steps": 3}))
        assert old.reward_floor_nats is None, name
        kept = config_from_mapping(job.config_type, recorded_config(job.spec, {"reward_floor_nats": 15.0}))
        assert kept.reward_floor_nats == 15.0, name
        assert job.config_type().reward_floor_nats == 15.0, name  # new runs get the floor
