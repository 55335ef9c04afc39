"""Inference-time win rates, KL estimates from samples, bootstrap intervals, curves and plots."""

from iapo_jax.evaluation.win_rates import (  # noqa: F401
    ESTIMATORS,
    PROCEDURES,
    PairedDifference,
    WinRate,
    bootstrap_win_rate,
    inference_time_win_rate,
    paired_bootstrap_difference,
    per_prompt_win_rates,
)
