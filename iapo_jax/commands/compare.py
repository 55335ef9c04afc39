"""``iapo compare``: CTRL against calibrated and raw-reward RLHF at a matched KL, evaluated under
best-of-N or worst-of-N, with the analytic tool's prediction beside each measured win rate."""

from __future__ import annotations

import sys

from iapo_jax.alignment.ctrl_config import RECORDED_WITHOUT_FLOOR
from iapo_jax.evaluation.comparison import CompareConfig
from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context
from iapo_jax.commands.job_inputs import (
    JobInputError,
    build_reward,
    record_reward,
    resolve_model_source,
    reward_spec,
)



def run(cfg: CompareConfig) -> dict:
    return run_as("compare", cfg)


def run_as(job: str, cfg: CompareConfig) -> dict:
    """The comparison under a job's name (``iapo quickstart`` is a compare with other defaults)."""
    from iapo_jax.evaluation.comparison import run_comparison
    from iapo_jax.evaluation.reused_pools import check_pools_from

    try:
        cfg.validate()
        check_pools_from(cfg)
    except ValueError as err:
        raise JobInputError(str(err)) from None
    # Bad models or rewards are one-line errors before anything loads.
    source = resolve_model_source(cfg.model)
    spec = reward_spec(cfg.reward, policy=source)
    reward = build_reward(spec)
    judge_specs = {j: reward_spec(j, policy=source, flag="--judges") for j in cfg.judges}
    judges = {j: build_reward(s) for j, s in judge_specs.items()}
    with job_context(job, cfg) as ctx:
        ctx.fingerprint_model("model", source)
        record_reward(ctx, "reward", spec)
        for i, judge_spec in enumerate(judge_specs.values()):
            record_reward(ctx, f"judge_{i}", judge_spec)
        return run_comparison(cfg, ctx, log=lambda msg: print(msg, file=sys.stderr), reward=reward,
                              model_source=source, judges=judges)


# Ignored: the training steps' stage timings (StageClock). Records from before the reward floor
# trained without one.
JOB = JobSpec(config=CompareConfig, run=run, reproduce_ignore=("*seconds",), record_defaults=RECORDED_WITHOUT_FLOOR)
