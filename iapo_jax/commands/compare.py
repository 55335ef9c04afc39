"""``iapo compare``: CTRL against calibrated and raw-reward RLHF at a matched KL, evaluated under
best-of-N or worst-of-N, with the analytic tool's prediction beside each measured win rate."""

from __future__ import annotations

import sys

from iapo_jax.evaluation.comparison import CompareConfig


def run(cfg: CompareConfig) -> dict:
    from iapo_jax.commands.common import job_context
    from iapo_jax.evaluation.comparison import run_comparison

    cfg.validate()
    with job_context("compare", cfg) as ctx:
        ctx.fingerprint_model("model", cfg.model)
        ctx.fingerprint_reward("reward", cfg.reward)
        return run_comparison(cfg, ctx, log=lambda msg: print(msg, file=sys.stderr))
