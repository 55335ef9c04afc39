"""Configuration of a CTRL run (calibrate-and-transform RL, arXiv 2412.19792)."""

from __future__ import annotations

import dataclasses
import math

from iapo_jax.alignment import losses
from iapo_jax.alignment.kl_control import DEFAULT_GAINS, KLControlSettings
from iapo_jax.alignment.optimizer import SCHEDULES, OptimizerConfig
from iapo_jax.theory.settings import PROCEDURES, TRANSFORMS

# 'raw' is RLHF on the uncalibrated reward; the rest transform the calibrated reward.
REWARD_TRANSFORMS = ("raw",) + TRANSFORMS
# 15 nats: floored responses keep under 3e-7 of the top's weight in the optimum, which moves its
# KL and win rates by less than 1e-4 on the exact testbed, and -exp at KL 1 converges.
DEFAULT_REWARD_FLOOR_NATS = 15.0
# What a run record written before the reward floor existed implies: it trained without one.
RECORDED_WITHOUT_FLOOR = {"reward_floor_nats": None}


def check_reward_floor_nats(value, name: str = "reward_floor_nats") -> None:
    """A floor is None or a positive, finite number of nats."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive number of nats (got {value!r}); "
                         f"try {DEFAULT_REWARD_FLOOR_NATS:g} (the default), or None for no floor")


@dataclasses.dataclass(frozen=True)
class CTRLConfig:
    """KL-regularised policy gradient on Phi(calibrated reward).

    transform: raw | identity | log | logit | exp | negexp | optimal. With exp/negexp and no t, t
      is the analytic tool's best t for (procedure, deploy_n) at the target KL (default 1 nat);
      optimal is the analytic tool's exact optimum log f*(u), tabulated, solved at optimal_kl
      (default: the target KL, else 1 nat).
    lam: soft_bon's selection temperature on the calibrated reward (required for soft_bon only).
    beta: KL weight, in units of the transformed reward; exp / negexp are rescaled onto [0, 1]
      (an affine map: same optimal policies, beta measured in the same units as for identity).
      With target_kl set, beta is adapted by kl_controller (see alignment.kl_control):
      'proportional' (Ziegler et al.'s rule on the per-batch KL) or 'predictive' (on the smoothed
      KL extrapolated kl_horizon steps ahead; kl_smoothing is the moving average's weight; beta
      kept within a factor kl_beta_range of its start, and the reward floor no higher than the
      starting beta puts it).
    kl_in_loss: False puts a k1 KL penalty in the reward (RLOO's classic form); True adds
      beta * 1/2 (log pi(y) - log pi_ref(y))^2 to the loss (kl_estimator 'k2', the only per-sample
      form whose gradient is the sequence KL's; see losses.kl_loss_term).
    temperature: must be 1. Rollouts, the PPO ratio, the KL and the reference pools all use the
      temperature-1 policy; sampling at another temperature would optimise a different objective.
    clip_eps / ppo_epochs: PPO-clip with several epochs per rollout; None / 1 is REINFORCE+RLOO.
    lora_rank: 0 trains all weights; r > 0 trains LoRA factors on the attention/MLP kernels.
    reward_floor_nats: the transformed reward is floored at max(Phi) - reward_floor_nats * beta
      (calibrated transforms only; None = no floor). The optimum pi_ref * exp(Phi/beta) / Z then
      gives floored responses at most e^-reward_floor_nats of the top responses' relative weight
      instead of e^-(range of Phi/beta): the same policy to within that mass, while the reward's
      range in nats stays bounded. Without it, a steep transform at a small beta (-exp for
      worst-of-4 at KL 1: Phi/beta spans 35,000 nats) lets the first policy-gradient steps push
      the good responses down with the bad through shared weights, and the run freezes far from
      the optimum (measured on the exact testbed; see ``iapo testbed``).
    """

    transform: str = "exp"
    t: float | None = None
    optimal_kl: float | None = None
    procedure: str = "bon"
    deploy_n: int = 4
    lam: float | None = None
    beta: float = 0.1
    target_kl: float | None = None
    kl_controller: str = "proportional"
    kl_controller_gain: float | None = None  # share of the KL error applied per step; None: the
    # controller's default (proportional 0.1, predictive 0.05)
    kl_smoothing: float = 0.1
    kl_horizon: float = 10.0
    kl_beta_range: float = 10.0
    samples_per_prompt: int = 4
    prompts_per_step: int = 8
    steps: int = 12
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine": decay to 0 over `steps` (x ppo_epochs updates)
    max_grad_norm: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    clip_eps: float | None = None
    ppo_epochs: int = 1
    kl_in_loss: bool = False
    kl_estimator: str = "k2"
    advantage: str = "rloo"
    reward_floor_nats: float | None = DEFAULT_REWARD_FLOOR_NATS
    seed: int = 0

    def kl_control_settings(self) -> KLControlSettings:
        gain = self.kl_controller_gain
        if gain is None:
            gain = DEFAULT_GAINS.get(self.kl_controller, 0.0)  # an unknown kind fails in validate
        return KLControlSettings(self.kl_controller, gain, self.kl_smoothing, self.kl_horizon, self.kl_beta_range)

    @property
    def optimizer(self) -> OptimizerConfig:
        """AdamW without weight decay; the warmup's first update is learning_rate / (warmup + 1), and
        'cosine' decays to 0 over steps x ppo_epochs updates (see alignment.optimizer)."""
        return OptimizerConfig(self.learning_rate, self.warmup_steps, 0.0, self.max_grad_norm,
                               schedule=self.lr_schedule, end_fraction=0.0, warmup_from_zero=False)

    def validate(self) -> "CTRLConfig":
        """Reject bad settings before any compute, each with the fix in the message."""
        if self.transform not in REWARD_TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; choose one of {REWARD_TRANSFORMS}")
        if self.procedure not in PROCEDURES:
            raise ValueError(f"unknown procedure {self.procedure!r}; choose one of {PROCEDURES}")
        if self.procedure == "soft_bon":
            lam = self.lam
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
                raise ValueError(f"procedure soft_bon needs a finite selection temperature lam > 0 (got "
                                 f"{lam!r}); e.g. --lam 0.1 (lam -> 0 is best-of-N)")
            if self.transform == "optimal" or (self.transform == "exp" and self.t is None):
                from iapo_jax.theory.soft_bon import check_lam

                check_lam(lam)  # the analytic tool's range, for the best t / the optimum
        elif self.lam is not None:
            raise ValueError(f"lam is soft_bon's selection temperature; leave it unset for {self.procedure}")
        if self.transform == "optimal":
            from iapo_jax.rewards.transforms import check_optimal_procedure

            check_optimal_procedure(self.procedure)
        if self.optimal_kl is not None and (self.transform != "optimal" or not self.optimal_kl > 0):
            raise ValueError(f"optimal_kl (got {self.optimal_kl}) is the positive KL at which the optimal "
                             "transform is solved; use it only with transform=optimal")
        if self.deploy_n < 1:
            raise ValueError(f"deploy_n must be at least 1 (got {self.deploy_n}); N=1 is plain sampling")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive (got {self.beta}); try 0.05-0.5")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"target_kl must be positive (got {self.target_kl}); or leave it unset")
        if self.t is not None and not self.t > 0:
            raise ValueError(f"t must be positive (got {self.t}); or leave it unset to use the best t")
        if self.transform == "exp" and self.procedure == "won":
            raise ValueError("the exp transform targets best-of-N; use transform=negexp for worst-of-N")
        if self.transform == "negexp" and self.procedure in ("bon", "soft_bon"):
            raise ValueError("the negexp transform targets worst-of-N; use transform=exp for best-of-N")
        if self.samples_per_prompt < 2 and self.advantage == "rloo":
            raise ValueError("RLOO needs samples_per_prompt >= 2")
        for name in ("prompts_per_step", "steps", "max_new_tokens", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (got {self.lora_rank}); 0 = full fine-tuning")
        if self.temperature != 1.0:
            raise ValueError(
                f"CTRL samples rollouts at temperature 1 (got temperature={self.temperature}): the "
                "policy gradient, the KL penalty and the reference pools all use the temperature-1 "
                "policy, so another temperature optimises a different objective; set temperature 1.0")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive (got {self.learning_rate}); try 1e-5")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (got {self.max_grad_norm}); it clips "
                             "the gradient norm, and 0 would zero every update (try 1.0)")
        if self.clip_eps is not None and not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be positive (got {self.clip_eps}); PPO clips the ratio "
                             "to [1 - eps, 1 + eps], try 0.2, or leave it unset for REINFORCE")
        check_reward_floor_nats(self.reward_floor_nats)
        self.kl_control_settings().validate()
        if self.lora_rank > 0 and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive (got {self.lora_alpha}); try 16")
        losses.get_kl_estimator(self.kl_estimator)
        if self.kl_in_loss:
            losses.check_kl_loss_estimator(self.kl_estimator)
        losses.get_advantage_estimator(self.advantage)
        return self
