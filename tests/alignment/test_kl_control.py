"""The KL controllers' rules (alignment.kl_control), checked step by step against hand arithmetic."""

import math

import pytest

from iapo_jax.alignment.ctrl_config import CTRLConfig
from iapo_jax.alignment.kl_control import (
    KLControlSettings,
    KLControlState,
    control_step,
    floor_beta,
    predictive_step,
    proportional_step,
)

PREDICTIVE = KLControlSettings("predictive", gain=0.1, smoothing=0.5, horizon=4.0, beta_range=10.0)


def test_proportional_is_ziegler_rule_with_its_clip():
    assert proportional_step(0.1, 1.1, 1.0, 0.1) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert proportional_step(0.1, 5.0, 1.0, 0.1) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    assert proportional_step(0.1, 0.0, 1.0, 0.1) == pytest.approx(0.1 * 0.98)


def test_predictive_smooths_extrapolates_and_moves_log_beta():
    s = predictive_step(KLControlState(0.1), 0.5, 1.0, PREDICTIVE, start_beta=0.1)
    assert (s.kl_ema, s.kl_slope) == (0.5, 0.0)  # the first KL is taken as it is
    assert s.beta == pytest.approx(0.1 * math.exp(0.1 * math.log(0.5)))
    s2 = predictive_step(s, 1.5, 1.0, PREDICTIVE, start_beta=0.1)
    ema = 0.5 + 0.5 * (1.5 - 0.5)  # 1.0
    slope = 0.5 * (ema - 0.5)  # 0.25 per step
    predicted = ema + 4.0 * slope  # 2.0: on its way over the target
    assert (s2.kl_ema, s2.kl_slope) == pytest.approx((ema, slope))
    assert s2.beta == pytest.approx(s.beta * math.exp(0.1 * math.log(predicted)))


def test_predictive_raises_beta_while_the_kl_is_still_under_target_but_rising_fast():
    """The anti-overshoot property: the proportional rule still lowers beta here."""
    state = KLControlState(0.1)
    for kl in (0.0, 0.2, 0.4, 0.6):  # rising 0.2 per step towards a target of 0.8
        state = predictive_step(state, kl, 0.8, PREDICTIVE, start_beta=0.1)
    before = state.beta
    state = predictive_step(state, 0.7, 0.8, PREDICTIVE, start_beta=0.1)
    assert state.beta > before
    assert proportional_step(before, 0.7, 0.8, 0.1) < before


def test_predictive_error_is_symmetric_in_log_space_and_bounded():
    up = predictive_step(KLControlState(0.1), 2.0, 1.0, PREDICTIVE, start_beta=0.1).beta
    down = predictive_step(KLControlState(0.1), 0.5, 1.0, PREDICTIVE, start_beta=0.1).beta
    assert up * down == pytest.approx(0.1 * 0.1)
    huge = predictive_step(KLControlState(0.1), 1e6, 1.0, PREDICTIVE, start_beta=0.1).beta
    zero = predictive_step(KLControlState(0.1), 0.0, 1.0, PREDICTIVE, start_beta=0.1).beta
    assert huge == pytest.approx(0.1 * math.exp(0.1)) and zero == pytest.approx(0.1 * math.exp(-0.1))


def test_predictive_beta_stays_within_its_range_of_the_start():
    state = KLControlState(0.1)
    for _ in range(500):  # a KL that never moves: without the range beta would fall to 1e-23
        state = predictive_step(state, 0.01, 1.0, PREDICTIVE, start_beta=0.1)
    assert state.beta == pytest.approx(0.01)
    for _ in range(500):
        state = predictive_step(state, 100.0, 1.0, PREDICTIVE, start_beta=0.1)
    assert state.beta == pytest.approx(1.0)


def test_the_floor_never_rises_above_the_start_under_the_predictive_controller():
    assert floor_beta(0.01, 0.1, PREDICTIVE) == 0.1
    assert floor_beta(0.3, 0.1, PREDICTIVE) == 0.3
    assert floor_beta(0.01, 0.1, KLControlSettings("proportional")) == 0.01
    assert floor_beta(0.01, 0.1, None) == 0.01


def test_state_round_trips_and_old_checkpoints_restore_beta():
    state = KLControlState(0.07, kl_ema=0.4, kl_slope=0.01)
    assert KLControlState.from_dict(state.to_dict(), beta=1.0) == state
    assert KLControlState.from_dict({"beta": 0.2}, beta=1.0) == KLControlState(0.2)
    assert KLControlState.from_dict({}, beta=0.3) == KLControlState(0.3)


def test_control_step_dispatches_on_the_kind():
    proportional = control_step(KLControlState(0.1), 2.0, 1.0, KLControlSettings("proportional", 0.1), 0.1)
    assert proportional == KLControlState(0.1 * 1.02)
    predictive = control_step(KLControlState(0.1), 2.0, 1.0, PREDICTIVE, 0.1)
    assert predictive.kl_ema == 2.0


@pytest.mark.parametrize("field,value,needle", [
    ("kl_controller", "pid", "unknown kl_controller"),
    ("kl_controller_gain", -0.1, "kl_controller_gain"),
    ("kl_controller_gain", float("nan"), "kl_controller_gain"),
    ("kl_smoothing", 0.0, "kl_smoothing"),
    ("kl_smoothing", 1.5, "kl_smoothing"),
    ("kl_horizon", -1.0, "kl_horizon"),
    ("kl_beta_range", 0.5, "kl_beta_range"),
])
def test_bad_controller_settings_are_refused_with_the_fix(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        CTRLConfig(**{field: value}).validate()
