"""The one optimizer every trainer uses: AdamW after global-norm clipping, on a warmup schedule.

Reward models and prefix scorers warm up from 0 and decay on a cosine to a tenth of the peak.
CTRL warms up from learning_rate / (warmup_steps + 1), so that its first update moves the policy
too, then holds the rate ('constant') or decays it to 0 ('cosine'): a decaying rate lets the
stochastic policy gradient settle on the optimum instead of jittering around it with a spread set
by the rate (measured on the exact testbed: see ``iapo testbed``).
"""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings and the learning-rate schedule (see the module docstring)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: str = "cosine"  # 'constant' | 'cosine' (after the linear warmup)
    end_fraction: float = 0.1  # cosine: the final rate is end_fraction * learning_rate
    warmup_from_zero: bool = True  # False: the first update is learning_rate / (warmup_steps + 1)

    def validate(self) -> "OptimizerConfig":
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive (got {self.learning_rate})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (got {self.max_grad_norm}); it clips "
                             "the gradient norm, and 0 would zero every update (try 1.0)")
        if not 0 <= self.end_fraction <= 1:
            raise ValueError(f"end_fraction must be in [0, 1] (got {self.end_fraction})")
        return self


def learning_rate_schedule(cfg: OptimizerConfig, total_updates: int) -> optax.Schedule:
    """Linear warmup to the peak, then constant or a cosine decay that ends at ``total_updates``."""
    cfg.validate()
    if cfg.schedule == "cosine" and total_updates < 1:
        raise ValueError(f"the number of training steps must be >= 1 (got {total_updates})")
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "cosine":  # a warmup longer than the run never reaches the peak
        warmup = min(warmup, total_updates - 1)
    first = 0.0 if cfg.warmup_from_zero and warmup else peak / (warmup + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=first, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_updates, warmup + 1), end_value=peak * cfg.end_fraction)
    return optax.linear_schedule(first, peak, warmup) if warmup else optax.constant_schedule(peak)


def make_optimizer(cfg: OptimizerConfig, total_updates: int = 0) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on ``learning_rate_schedule(cfg, total_updates)``."""
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(learning_rate_schedule(cfg, total_updates), weight_decay=cfg.weight_decay))
