"""Rewards: the scoring protocol and registry, packaged scorers, calibration and transforms."""

from iapo_jax.rewards.base import Reward, check_batch, check_scores
from iapo_jax.rewards.calibration import ReferencePool, calibrate, calibrate_sorted, check_pool
from iapo_jax.rewards.registry import available_rewards, get_reward, register_reward
from iapo_jax.rewards.transforms import (
    DEFAULT_EPS,
    TRANSFORMS,
    available_transforms,
    calibrated_transform,
    get_transform,
)

__all__ = [
    "DEFAULT_EPS",
    "ReferencePool",
    "Reward",
    "TRANSFORMS",
    "available_rewards",
    "available_transforms",
    "calibrate",
    "calibrate_sorted",
    "calibrated_transform",
    "check_batch",
    "check_pool",
    "check_scores",
    "get_reward",
    "get_transform",
    "register_reward",
]
