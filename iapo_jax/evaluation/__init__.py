"""Inference-time win rates, KL estimates from samples, bootstrap intervals, curves and plots."""

from iapo_jax.evaluation.win_rates import (  # noqa: F401
    PROCEDURES,
    WinRate,
    bootstrap_win_rate,
    inference_time_win_rate,
    per_prompt_win_rates,
)
