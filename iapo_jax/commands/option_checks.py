"""Checks every job's options get by field name, before the job runs (so before any model loads).

Jobs share their option names (``learning_rate``, ``steps``, ``dtype``, ...), so a rule written
once here covers every job that has the field, including jobs added later. A job's own checks
(``check_config`` and friends) still run inside it for what only it knows (combinations, paths).
``None`` always passes: it means "not set" (the job picks the value).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from iapo_jax.errors import IapoError

# Model dtypes the jobs train and sample in; float16 has no loss scaling here, so it is refused.
JOB_DTYPES = ("float32", "bfloat16")

# Rates and scales that must be > 0.
POSITIVE_NUMBERS = ("learning_rate", "lr", "lora_alpha", "beta", "target_kl", "clip_eps", "kl",
                    "temperature", "t", "max_grad_norm")
# Weights and tolerances where 0 means "none" but a negative value means nothing.
NON_NEGATIVE_NUMBERS = ("weight_decay", "margin", "margin_from_gap", "center_coef", "min_gap",
                        "kl_controller_gain", "kl_horizon", "rtol", "atol")
# Counts and sizes that must be at least 1.
POSITIVE_COUNTS = ("steps", "samples", "samples_per_prompt", "prompts_per_step",
                   "max_new_tokens", "batch_size", "batch_prompts", "train_prompts", "eval_prompts",
                   "num_prompts", "deploy_n", "n", "eval_samples", "repeats", "ppo_epochs",
                   "block_size", "cd_k", "cd_samples", "reference_samples", "bootstrap",
                   "features", "batch", "keep_last", "blockwise_k", "max_length", "cd_top_k",
                   "fsdp", "tensor", "probe_samples", "rollout_tokens")
# Counts where 0 means "off" or "all".
NON_NEGATIVE_COUNTS = ("warmup_steps", "lora_rank", "top_k", "probe_every", "max_pairs",
                       "eval_every")
# Lists whose every entry must be at least 1 / above 0.
POSITIVE_COUNT_LISTS = ("ns", "eval_ns")
POSITIVE_NUMBER_LISTS = ("kls", "betas", "sweep_kls")
# Probabilities in (0, 1].
FRACTIONS = ("top_p", "kl_smoothing")


# What to pass instead, where the default alone would not say it.
HINTS = {
    "clip_eps": "PPO clips the ratio to [1 - eps, 1 + eps]: try 0.2, or leave it unset for REINFORCE",
    "max_grad_norm": "it is the gradient-norm clip; try 1.0",
}


class OptionError(IapoError, ValueError):
    """An option's value means nothing (a negative rate, an empty size, an unsupported dtype)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(cls: type, name: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default if field.default is not dataclasses.MISSING else None


def _fix(cls: type, name: str) -> str:
    if name in HINTS:
        return f" ({HINTS[name]})"
    if name in ("dtype", "dtypes"):
        return ""
    default = _default(cls, name)
    return f" (the default is {default})" if default not in (None, (), "") else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(cfg: Any) -> None:
    """Raise OptionError (one line: the flag, its value, what it must be) for the first option
    of ``cfg`` (a job's config dataclass) whose value no job can use."""
    if not dataclasses.is_dataclass(cfg):
        return
    cls = type(cfg)
    for field in dataclasses.fields(cfg):
        name, value = field.name, getattr(cfg, field.name)
        if value is None:
            continue
        message = _problem(name, value)
        if message:
            raise OptionError(f"{_flag(name)} {message}{_fix(cls, name)}")
    _check_combinations(cfg)


def _check_combinations(cfg: Any) -> None:
    """Pairs of options that cannot work together, by field names the jobs share."""
    if getattr(cfg, "method", None) == "cdq" and isinstance(getattr(cfg, "top_k", None), int) \
            and cfg.top_k < 1:
        raise OptionError(f"--method cdq bootstraps from the top --top-k tokens of the policy, so "
                          f"--top-k must be at least 1, got {cfg.top_k} (the default is 8)")


def _problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for an option called ``name`` (None when nothing is)."""
    if name == "dtype" and isinstance(value, str) and value not in JOB_DTYPES:
        return (f"{value} is not supported; use float32 or bfloat16 (float16 would need loss "
                "scaling, which the jobs do not do)")
    if name == "dtypes" and isinstance(value, (tuple, list)):
        bad = [v for v in value if v not in JOB_DTYPES]
        if bad:
            return f"{bad[0]} is not supported; use float32 or bfloat16"
    if _is_number(value) and isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if name in POSITIVE_NUMBERS and _is_number(value) and not value > 0:
        return f"must be a positive number, got {value}"
    if name in NON_NEGATIVE_NUMBERS and _is_number(value) and value < 0:
        return f"must be >= 0 (0 = none), got {value}"
    if name in POSITIVE_COUNTS and _is_number(value) and value < 1:
        return f"must be at least 1, got {value}"
    if name in NON_NEGATIVE_COUNTS and _is_number(value) and value < 0:
        return f"must be >= 0 (0 = off), got {value}"
    if name == "data" and _is_number(value) and value < 1 and value != -1:
        return f"must be a positive device count or -1 (all devices left over), got {value}"
    if name in FRACTIONS and _is_number(value) and not 0 < value <= 1:
        return f"must be in (0, 1] (1 keeps every token), got {value}"
    if name == "confidence" and _is_number(value) and not 0 < value < 1:
        return f"must be in (0, 1), e.g. 0.95, got {value}"
    if isinstance(value, (tuple, list)):
        if name in POSITIVE_COUNT_LISTS:
            bad = [v for v in value if _is_number(v) and v < 1]
            if bad:
                return f"entries must be at least 1, got {bad[0]}"
        if name in POSITIVE_NUMBER_LISTS:
            bad = [v for v in value if _is_number(v) and not v > 0]
            if bad:
                return f"entries must be positive numbers, got {bad[0]}"
    return None
