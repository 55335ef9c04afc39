"""``iapo testbed``: does CTRL reach the optimum it claims? Exact answers on enumerable policies.

    iapo testbed                                   # every transform, KL 0.25 / 0.5 / 1, every option
    iapo testbed --transforms negexp --kls 0.5 --options rloo --steps 600 --json negexp.json
    iapo testbed --cases sequence --transforms identity exp
    iapo testbed --kl-controller predictive --steps 150 --samples-per-prompt 8   # does beta land?

Each run trains the real CTRLTrainer (the code path of ``iapo ctrl``: sampler rollouts, an m-sample
calibration pool, the transform, the KL penalty, the compiled step) on a random-init transformer
whose whole response distribution can be enumerated: one-token responses over 1,024 tokens
(case ``single``) or 3-token responses over 8 tokens (case ``sequence``). The trained policy's KL
and win rates are then computed exactly and compared with the exact optimum
pi_ref * exp(Phi(u)/beta) / Z of the trainer's own Phi and beta (beta set so that the optimum has
the target KL), and with the closed form at the measured KL. Target: |W - W_opt| <= 0.01 and
|KL - KL_opt| <= 10% of KL_opt. Writes testbed.json, testbed.md, testbed_points.png and
testbed_learning_curves.png into the run directory (and --json PATH if given).
"""

from __future__ import annotations

import dataclasses
import json as json_lib
import math
from pathlib import Path
from typing import Literal

from iapo_jax.alignment.ctrl_config import (
    DEFAULT_REWARD_FLOOR_NATS,
    RECORDED_WITHOUT_FLOOR,
    CTRLConfig,
    check_reward_floor_nats,
)
from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import current_context
from iapo_jax.commands.job_inputs import JobInputError

TRANSFORMS = ("identity", "exp", "negexp", "log", "raw")
OPTION_NAMES = ("rloo", "ppo", "kl_in_loss")


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Train CTRL on exactly enumerable policies and compare it with the exact optimum."""

    cases: tuple[Literal["single", "sequence"], ...] = ("single",)
    """Settings: 'single' (one-token responses, 1,024 tokens) and/or 'sequence' (3 tokens over 8)."""
    transforms: tuple[Literal["identity", "exp", "negexp", "log", "raw", "optimal", "optimal_won",
                              "soft_exp", "soft_optimal"], ...] = TRANSFORMS
    """Transforms to train (exp is deployed as best-of-4, negexp as worst-of-4, log as best-of-4;
    optimal / optimal_won: the closed form's exact optimum for best- / worst-of-4 at each KL;
    soft_exp / soft_optimal: exp with its best t / the exact optimum, for soft best-of-4 at
    lam 0.1)."""
    kls: tuple[float, ...] = (0.25, 0.5, 1.0)
    """KLs of the optimum: beta is solved so that pi_opt has this KL."""
    options: tuple[Literal["rloo", "ppo", "kl_in_loss"], ...] = OPTION_NAMES
    """Optimiser options: RLOO with KL in the reward, PPO-clip (2 epochs), RLOO with KL in the loss."""
    steps: int | None = None
    """RL steps per run (default: 400; 600 for the sequence case; 800 for negexp, 1,600 for
    negexp in the sequence case)."""
    samples_per_prompt: int | None = None
    """Rollouts per prompt per step, 4 prompts per step (default: 64; 256 for negexp and the
    sequence case)."""
    pool_size: int = 512
    """Reference samples per prompt in the calibration pool."""
    learning_rate: float = 2e-3
    """Adam learning rate (peak of the schedule)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after a 10-step warmup."""
    t: float | None = None
    """Exponent of the exp / negexp transforms (default: the closed form's best t at each KL)."""
    eval_every: int = 50
    """Steps between exact evaluations (the learning curves)."""
    reward_floor_nats: float | None = DEFAULT_REWARD_FLOOR_NATS
    """The trainer's reward floor, max(Phi) - this * beta (None: none, as ``iapo ctrl
    --reward-floor-nats None``); the target is the optimum of the floored reward, and each record
    also gives the unfloored optimum."""
    kl_controller: Literal["proportional", "predictive"] | None = None
    """Adapt beta towards each target KL with this controller (see alignment.kl_control), starting
    at --start-beta-factor x the optimum's beta; None holds beta at the optimum's."""
    kl_controller_gain: float | None = None
    """The controller's gain (unset: its default, 0.1 proportional, 0.05 predictive)."""
    start_beta_factor: float = 1.0
    """With a KL controller: the starting beta as a multiple of the optimum's."""
    seed: int = 0
    """Seed of the model weights, prompts, reward table, pool and training."""
    json: Path | None = None
    """Also write the JSON records here."""

    def validate(self) -> "TestbedConfig":
        for name in ("steps", "samples_per_prompt", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 2:
            raise ValueError("--samples-per-prompt must be at least 2 (RLOO needs a leave-one-out baseline)")
        if self.pool_size < 2:
            raise ValueError(f"--pool-size must be at least 2 (got {self.pool_size}); 512 is the default")
        if self.t is not None and not self.t > 0:
            raise ValueError(f"--t must be positive (got {self.t}); or leave it unset for the best t")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be positive (got {self.learning_rate})")
        check_reward_floor_nats(self.reward_floor_nats, "--reward-floor-nats")
        if not (self.start_beta_factor > 0 and math.isfinite(self.start_beta_factor)):
            raise ValueError(f"--start-beta-factor must be a positive number (got {self.start_beta_factor})")
        if self.start_beta_factor != 1.0 and self.kl_controller is None:
            raise ValueError("--start-beta-factor moves where a KL controller starts; set --kl-controller "
                             "predictive (or proportional), or leave the factor at 1")
        CTRLConfig(kl_controller=self.kl_controller or "proportional",
                   kl_controller_gain=self.kl_controller_gain).kl_control_settings().validate()
        if not self.kls or any(not k > 0 for k in self.kls):
            raise ValueError(f"--kls must be positive KLs in nats (got {self.kls}); e.g. --kls 0.25 0.5 1")
        for what in ("cases", "transforms", "options"):
            if not getattr(self, what):
                raise ValueError(f"--{what} needs at least one value")
        if self.json is not None:
            path = Path(self.json)
            if path.is_dir():
                raise ValueError(f"--json {path} is a directory; give a file name such as testbed.json")
            if not path.parent.exists():
                raise ValueError(f"--json {path}: folder {path.parent} does not exist; create it first")
        return self


def run(cfg: TestbedConfig) -> dict:
    try:
        cfg.validate()  # every check before any compute
    except ValueError as err:
        raise JobInputError(str(err)) from None
    from iapo_jax.runtime.progress import progress
    from iapo_jax.testbed import report
    from iapo_jax.testbed.exact import response_log_probs
    from iapo_jax.testbed.run import RunSettings, reference_pool, run_case, settings_for
    from iapo_jax.testbed.setting import build_setting, spec_for

    ctx = current_context()
    out_dir = ctx.run_dir if ctx is not None else Path(".")
    base = RunSettings(pool_size=cfg.pool_size, learning_rate=cfg.learning_rate,
                       lr_schedule=cfg.lr_schedule, eval_every=cfg.eval_every, seed=cfg.seed,
                       reward_floor_nats=cfg.reward_floor_nats, kl_controller=cfg.kl_controller,
                       kl_controller_gain=cfg.kl_controller_gain, start_beta_factor=cfg.start_beta_factor)
    records, curves = [], []
    bar = progress(total=len(cfg.cases) * len(cfg.transforms) * len(cfg.kls) * len(cfg.options),
                   desc="testbed", unit="run")
    for case in cfg.cases:
        setting = build_setting(spec_for(case, cfg.seed))
        ref_logp = response_log_probs(setting.reference, setting)
        pool = reference_pool(setting, cfg.pool_size, cfg.seed)
        for transform in cfg.transforms:
            for kl in cfg.kls:
                for option in cfg.options:
                    print(f"{case} / {transform} / KL {kl:g} / {option}", flush=True)
                    settings = settings_for(case, transform, base, steps=cfg.steps,
                                            samples_per_prompt=cfg.samples_per_prompt)
                    result = run_case(setting, transform, float(kl), option, settings, pool=pool,
                                      ref_logp=ref_logp, t=cfg.t, log=print)
                    records.append(result.record)
                    curves.append(result.curve)
                    r = result.record
                    print(f"  -> W {r['win_rate']:.4f} (opt {r['optimum_win_rate']:.4f}), KL {r['kl']:.4f} "
                          f"(opt {r['optimum_kl']:.4f}), beta {r['final_beta']:.4g} (opt {r['beta']:.4g}), "
                          f"{r['seconds']:.0f} s, target "
                          f"{'met' if r['meets_target'] else 'MISSED'}", flush=True)
                    if ctx is not None:
                        ctx.log(len(records), {f"{case}/{transform}/{kl:g}/{option}/{k}": r[k]
                                               for k in ("kl", "win_rate", "optimum_win_rate")})
                    bar.update(1)
    bar.close()
    payload = {"records": records, "curves": curves}
    text = json_lib.dumps(payload, indent=1) + "\n"
    (out_dir / "testbed.json").write_text(text)
    if cfg.json is not None:
        Path(cfg.json).write_text(text)
    table = report.markdown_table(records)
    summary = report.summary_line(records)
    (out_dir / "testbed.md").write_text(f"{summary}\n\n{table}\n")
    report.plot_points(records, out_dir / "testbed_points.png")
    report.plot_learning_curves(records, curves, out_dir / "testbed_learning_curves.png")
    print(f"\n{table}\n\n{summary}\nwritten to {out_dir}")
    return {
        "runs": len(records),
        "runs_meeting_target": sum(r["meets_target"] for r in records),
        "max_abs_win_rate_error": max(abs(r["win_rate_error"]) for r in records),
        "max_abs_kl_relative_error": max(abs(r["kl_relative_error"]) for r in records),
        "seconds": sum(r["seconds"] for r in records),
    }


if __name__ == "__main__":
    import tyro

    run(tyro.cli(TestbedConfig))


JOB = JobSpec(config=TestbedConfig, run=run, reproduce_ignore=("*seconds",),
              record_defaults=RECORDED_WITHOUT_FLOOR)  # records from before the reward floor: no floor
