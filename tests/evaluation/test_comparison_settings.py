"""Comparison settings: the learning-rate warmup every method trains with, and N against the
number of evaluation samples, checked on the configs and on the shipped experiment files."""

from pathlib import Path

import pytest

from iapo_jax.commands.configs import config_from_mapping, load_yaml
from iapo_jax.evaluation.comparison import METHODS, CompareConfig

CONFIGS = sorted((Path(__file__).parents[2] / "experiments" / "ctrl").glob("*.yaml"))


@pytest.mark.parametrize("steps,warmup", [(1, 1), (6, 1), (10, 1), (16, 2), (40, 4), (100, 10)])
def test_default_warmup_is_a_tenth_of_the_steps_and_reaches_every_method(steps, warmup):
    cfg = CompareConfig(steps=steps, methods=tuple(METHODS)).validate()
    for method in METHODS:
        assert cfg.ctrl_config(method).warmup_steps == warmup
        assert cfg.ctrl_config(method, beta=0.2).warmup_steps == warmup  # sweep points too


def test_explicit_warmup_is_passed_through_and_checked():
    assert CompareConfig(warmup_steps=0).validate().ctrl_config("ctrl").warmup_steps == 0
    assert CompareConfig(warmup_steps=3).validate().ctrl_config("raw").warmup_steps == 3
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        CompareConfig(warmup_steps=-1).validate()


def test_unbiased_win_rates_need_as_many_evaluation_samples_as_the_largest_n():
    with pytest.raises(ValueError, match=r"eval_samples \(8\) must be at least the largest N .* \(16\)"):
        CompareConfig(eval_samples=8, samples_per_prompt=4, eval_ns=(1, 16)).validate()
    CompareConfig(eval_samples=8, samples_per_prompt=4, eval_ns=(1, 8), deploy_n=4).validate()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_experiment_configs_train_with_warmup(path):
    cfg = config_from_mapping(CompareConfig, load_yaml(path)).validate()
    assert 1 <= cfg.ctrl_config(cfg.methods[0]).warmup_steps <= max(1, cfg.steps // 5)


def test_kl_controller_and_schedule_reach_every_method():
    """compare's controller reaches each method's trainer with its own default gain; sweep points
    hold beta fixed and get no controller target."""
    old = CompareConfig().validate()
    assert (old.ctrl_config("ctrl").kl_controller, old.ctrl_config("ctrl").kl_controller_gain) == ("proportional", 0.5)
    cfg = CompareConfig(kl_controller="predictive", lr_schedule="cosine", methods=tuple(METHODS)).validate()
    for method in METHODS:
        mcfg = cfg.ctrl_config(method)
        assert (mcfg.kl_controller, mcfg.kl_control_settings().gain, mcfg.lr_schedule) == ("predictive", 0.05, "cosine")
        assert cfg.ctrl_config(method, beta=0.2).target_kl is None
    with pytest.raises(ValueError, match="kl_controller_gain"):
        CompareConfig(kl_controller="predictive", kl_controller_gain=-1.0).validate()
