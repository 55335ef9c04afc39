"""CTRL: calibrate-and-transform RL (InfAlign, arXiv 2412.19792), and its baselines in one trainer.

One step: sample n responses per prompt from the current policy with log-probs under the policy and
the frozen reference, score them, calibrate each score against that prompt's reference pool, apply
the transform, fold in the KL penalty, turn rewards into leave-one-out advantages and take one (or,
with PPO, several) jit-compiled gradient steps. 'raw' RLHF skips calibration; 'identity' is
calibrated RLHF; 'log' is the best-of-N distillation target; 'exp' / 'negexp' are CTRL for
best-of-N / worst-of-N.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iapo_jax.alignment import losses
from iapo_jax.alignment.ctrl_config import CTRLConfig
from iapo_jax.alignment.ctrl_step import (
    RolloutBatch,
    StepOptions,
    make_train_step,
    policy_state,
    sequence_rewards_to_advantages,
)
from iapo_jax.alignment.kl_control import KLControlState, control_step, floor_beta
from iapo_jax.alignment.optimizer import OptimizerConfig, make_optimizer
from iapo_jax.alignment.trainer import Hook, Trainer
from iapo_jax.decoding.engine import sample_batch
from iapo_jax.decoding.inputs import prepare
from iapo_jax.models import lora
from iapo_jax.parallel.sharded_step import check_batch_divides, data_parallel_size
from iapo_jax.rewards.calibration import ReferencePool
from iapo_jax.rewards.transforms import get_transform, optimal_table, transform_top, unit_range_transform
from iapo_jax.runtime.stage_clock import StageClock


def check_same_tokenizer(policy, reference, tokenizer=None, ref_tokenizer=None) -> None:
    """Policy and reference must share a vocabulary, or log-ratios compare different tokens."""
    if policy.config.vocab_size != reference.config.vocab_size:
        raise ValueError(
            f"policy vocabulary ({policy.config.vocab_size}) differs from the reference's "
            f"({reference.config.vocab_size}); start the policy from the reference checkpoint"
        )
    if tokenizer is not None and ref_tokenizer is not None and tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ValueError("policy and reference tokenizers differ; use the reference's tokenizer for both")


def resolve_t(cfg: CTRLConfig) -> float | None:
    """The transform parameter: given, or the analytic tool's best t for (procedure, N, KL)."""
    if cfg.transform not in ("exp", "negexp"):
        return None
    if cfg.t is not None:
        return float(cfg.t)
    from iapo_jax.theory.analysis import analyse

    target = cfg.target_kl if cfg.target_kl is not None else 1.0
    return float(analyse(cfg.procedure, cfg.deploy_n, cfg.transform, kl=target, lam=cfg.lam).t)


def resolve_table(cfg: CTRLConfig):
    """The 'optimal' transform's table: the exact optimum for (procedure, N, lam) at optimal_kl
    (default: the target KL, else 1 nat)."""
    if cfg.transform != "optimal":
        return None
    target = next(k for k in (cfg.optimal_kl, cfg.target_kl, 1.0) if k is not None)
    return optimal_table(cfg.procedure, cfg.deploy_n, kl=float(target), lam=cfg.lam)


def reward_floor(top: float | None, beta: float, nats: float | None) -> float | None:
    """The floor top - nats * beta (see CTRLConfig.reward_floor_nats); None without a floor."""
    if top is None or nats is None:
        return None
    return top - nats * beta


def floored(values, level: float | None):
    """``values`` raised to the floor ``level`` (None: as they are)."""
    if level is None:
        return values
    return np.maximum(values, np.asarray(level, np.asarray(values).dtype))


@functools.lru_cache(maxsize=16)
def compiled_step(graphdef, opts: StepOptions, optimizer: OptimizerConfig, mesh=None, total_updates: int = 0):
    """One jitted step per (model structure, options, optimizer settings, mesh): trainers of several
    methods on the same model share the compiled program instead of compiling their own."""
    tx = make_optimizer(optimizer, total_updates)
    return tx, make_train_step(graphdef, tx, opts, mesh)


# One compiled program instead of a few hundred eager ops per step (0.3-0.7 s on SmolLM2).
_merged_lora_state = jax.jit(policy_state, static_argnums=(2,))


@dataclasses.dataclass
class StepResult:
    metrics: dict[str, float]
    texts: tuple[str, ...]


class CTRLTrainer(Trainer):
    """Trains `policy` (updated in place) against a frozen `reference` on Phi(calibrated reward).

    reward: a batched `score(prompts, responses) -> [n]` (see iapo_jax.rewards).
    pool: reference pools for every training prompt (and the probe prompts, if any).
    mesh: a ('data', 'fsdp', 'tensor') mesh (iapo_jax.parallel.make_mesh) to train on: parameters
      and optimizer state sharded by their logical names, the rollout rows over data x fsdp, and
      sampling split over the 'data' axis. prompts_per_step x samples_per_prompt must divide
      over data x fsdp.
    """

    def __init__(
        self,
        cfg: CTRLConfig,
        policy,
        reference,
        tokenizer,
        reward,
        pool: ReferencePool | None,
        train_prompts: Sequence[str],
        *,
        probe_prompts: Sequence[str] = (),
        ref_tokenizer=None,
        log: Callable[..., None] | None = None,
        mesh=None,
    ):
        self.cfg = cfg.validate()
        if mesh is not None:  # before any compute: the rollout batch must split evenly
            check_batch_divides(cfg.prompts_per_step * cfg.samples_per_prompt, mesh,
                                "rollout batch (prompts_per_step x samples_per_prompt)")
        self.mesh = mesh
        check_same_tokenizer(policy, reference, tokenizer, ref_tokenizer)
        if cfg.transform != "raw":
            if pool is None:
                raise ValueError(f"transform {cfg.transform!r} needs reference pools; build them first "
                                 "(iapo calibrate) or use transform='raw'")
            missing = [p for p in list(train_prompts) + list(probe_prompts) if p not in set(pool.prompts)]
            if missing:
                raise ValueError(f"{len(missing)} prompts have no reference pool (first: {missing[0]!r}); "
                                 "calibrate on the same prompt set")
        if not train_prompts:
            raise ValueError("no training prompts given")
        self.policy, self.reference, self.tokenizer, self.reward, self.pool = (
            policy, reference, tokenizer, reward, pool)
        self.train_prompts, self.probe_prompts = list(train_prompts), list(probe_prompts)
        self.log = log
        self.t, self.table = resolve_t(cfg), resolve_table(cfg)
        if cfg.transform != "raw":
            get_transform(cfg.transform, self.t, table=self.table)  # validates t
        # log / logit clip at half the pool's resolution, 1/(2m).
        self.eps = None if pool is None else 1.0 / (2 * pool.num_samples)
        self.phi = None if cfg.transform == "raw" else unit_range_transform(
            cfg.transform, self.t, self.eps, self.table)
        self.phi_top = None if self.phi is None else transform_top(self.phi, self.eps)
        self.kl_state = KLControlState(beta=float(cfg.beta))
        self.opts = StepOptions(
            lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, kl_in_loss=cfg.kl_in_loss,
            kl_estimator=cfg.kl_estimator, use_clip=cfg.clip_eps is not None,
        )
        self.graphdef, base = nnx.split(policy)
        key = jax.random.key(cfg.seed)
        self.key, lora_key = jax.random.split(key)
        if cfg.lora_rank:
            self.frozen, self.trainable = base, lora.init_lora(base, cfg.lora_rank, lora_key)
        else:
            # Own copies: the step donates them, and `policy` may share buffers with the reference.
            self.frozen, self.trainable = None, jax.tree.map(jnp.copy, base)
        decay_updates = cfg.steps * cfg.ppo_epochs if cfg.lr_schedule == "cosine" else 0
        self.optimizer, self._step_fn = compiled_step(self.graphdef, self.opts, cfg.optimizer, mesh,
                                                      decay_updates)
        self.opt_state = self.optimizer.init(self.trainable)
        self.place_state()
        self.step = 0
        order = np.random.default_rng(cfg.seed).permutation(len(self.train_prompts))
        self._order = [self.train_prompts[i] for i in order]

    # -- state ----------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        """The current KL weight (the controller's, with target_kl set)."""
        return self.kl_state.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.kl_state = dataclasses.replace(self.kl_state, beta=float(value))

    def current_policy(self):
        """The policy with the latest weights (LoRA factors merged) as an NNX module."""
        if not self.opts.lora_rank:
            return nnx.merge(self.graphdef, self.trainable)
        return nnx.merge(self.graphdef, _merged_lora_state(self.frozen, self.trainable, self.opts))

    def checkpoint_items(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this run exactly (see runtime.checkpointing)."""
        return {
            "model": self.trainable, "opt_state": self.opt_state, "rng": self.key,
            "data_position": self.step, "extra": self.kl_state.to_dict(),
        }

    def restore(self, restored) -> None:
        """Continue from a `Checkpointer.restore(model=..., opt_state=...)` result."""
        self.trainable, self.opt_state = restored.model, restored.opt_state
        self.place_state()  # whatever mesh the checkpoint was restored onto, train on this one
        self.key, self.step = restored.rng, int(restored.data_position)
        self.kl_state = KLControlState.from_dict(restored.meta.get("extra", {}), self.beta)

    # -- one step -------------------------------------------------------------------------------
    def _prompts_for(self, step: int) -> list[str]:
        k = self.cfg.prompts_per_step
        start = (step * k) % len(self._order)
        idx = [(start + i) % len(self._order) for i in range(k)]
        return [self._order[i] for i in idx]

    def shaped_rewards(self, prompts: Sequence[str], raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores [P, n] -> (calibrated [P, n] or NaN for 'raw', task reward R [P, n]).

        R is Phi(u), floored at the current beta's floor (CTRLConfig.reward_floor_nats)."""
        if self.cfg.transform == "raw":
            return np.full_like(raw, np.nan), raw
        u = np.asarray(self.pool.calibrate(list(prompts), raw), np.float32)
        return u, floored(np.asarray(self.phi(jnp.asarray(u)), np.float32), self.floor_level())

    def floor_level(self) -> float | None:
        """The reward floor at the current beta, or under the predictive controller at the larger of
        it and the starting beta (None: no floor)."""
        cfg = self.cfg
        settings = cfg.kl_control_settings() if cfg.target_kl is not None else None
        return reward_floor(self.phi_top, floor_beta(self.beta, cfg.beta, settings), cfg.reward_floor_nats)

    def train_step(self) -> StepResult:
        cfg, n = self.cfg, self.cfg.samples_per_prompt
        clock = StageClock()  # where the step's time goes: <stage>_seconds in the metrics
        prompts = self._prompts_for(self.step)
        self.key, sample_key = jax.random.split(self.key)
        policy = self.current_policy()
        clock.lap("merge", nnx.state(policy))
        batch = prepare(policy, prompts, max_new_tokens=cfg.max_new_tokens, tokenizer=self.tokenizer,
                        key=sample_key, temperature=cfg.temperature, mesh=self.mesh)
        out = sample_batch(policy, batch, n=n, ref_model=self.reference, tokenizer=self.tokenizer,
                           mesh=self.mesh, clock=clock)
        responses = list(out.texts)
        raw = self.reward.score([p for p in prompts for _ in range(n)], responses)
        raw = np.asarray(raw, np.float32).reshape(len(prompts), n)
        clock.lap("reward")
        calibrated, task = self.shaped_rewards(prompts, raw)
        lengths = out.lengths
        mask = (jnp.arange(out.tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
        adv = sequence_rewards_to_advantages(
            jnp.asarray(task.reshape(-1)), out.raw_logprobs, out.ref_logprobs, mask, self.beta, n,
            cfg.kl_in_loss, cfg.advantage,
        )
        real = batch.real_rows  # rows a mesh padded the prompts with are not part of the rollout
        # One prompt row per prompt (its n responses share the prompt's forward pass in the step),
        # unless the prompts alone would not split evenly over the mesh's data axes.
        prompt_ids, prompt_mask = batch.ids[:real], batch.mask[:real]
        if self.mesh is not None and real % data_parallel_size(self.mesh):
            prompt_ids, prompt_mask = jnp.repeat(prompt_ids, n, axis=0), jnp.repeat(prompt_mask, n, axis=0)
        rollout = RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            tokens=out.tokens, lengths=lengths, advantages=adv,
            old_logp=out.raw_logprobs, ref_logp=out.ref_logprobs,
        )
        clock.lap("calibration", rollout)
        m = self.update(rollout)
        clock.lap("update", m)
        seq_kl = losses.sequence_kl(out.raw_logprobs, out.ref_logprobs, mask, "k1")
        kl = float(jnp.mean(seq_kl))
        metrics = {k: float(v) for k, v in m.items()}
        metrics.update(
            raw_reward=float(raw.mean()), task_reward=float(task.mean()), kl=kl, beta=self.beta,
            response_tokens=float(jnp.mean(lengths)),
        )
        if cfg.transform != "raw":
            metrics["calibrated_reward"] = float(np.mean(calibrated))
        level = self.floor_level()
        if level is not None:  # how much of the batch sits on the floor
            metrics["floored_fraction"] = float(np.mean(task <= level))
        if cfg.target_kl is not None:
            self.kl_state = control_step(self.kl_state, kl, cfg.target_kl, cfg.kl_control_settings(), cfg.beta)
        clock.lap("metrics")
        metrics.update(clock.metrics())
        self.step += 1
        return StepResult(metrics, tuple(responses))

    def update(self, rollout: RolloutBatch) -> dict:
        """The compiled policy update(s) on one rollout batch (ppo_epochs of them); returns metrics."""
        cfg = self.cfg
        clip = jnp.float32(cfg.clip_eps if cfg.clip_eps is not None else 0.2)
        for _ in range(cfg.ppo_epochs):
            self.trainable, self.opt_state, m = self._step_fn(
                self.trainable, self.frozen, self.opt_state, rollout, jnp.float32(self.beta), clip)
        return m

    # -- probe ------------------------------------------------------------------------------------
    def probe_win_rate(self, samples_per_prompt: int | None = None, seed: int = 1234) -> float:
        """E[C(x, y)] for fresh policy samples on the probe prompts = win rate against pi_ref."""
        if not self.probe_prompts or self.pool is None:
            return float("nan")
        samples_per_prompt = samples_per_prompt or self.cfg.samples_per_prompt
        policy = self.current_policy()
        batch = prepare(policy, self.probe_prompts, max_new_tokens=self.cfg.max_new_tokens,
                        tokenizer=self.tokenizer, key=seed, mesh=self.mesh)
        out = sample_batch(policy, batch, n=samples_per_prompt, tokenizer=self.tokenizer, mesh=self.mesh)
        rep = [p for p in self.probe_prompts for _ in range(samples_per_prompt)]
        raw = np.asarray(self.reward.score(rep, list(out.texts)), np.float32)
        u = self.pool.calibrate(self.probe_prompts, raw.reshape(len(self.probe_prompts), -1))
        return float(np.mean(u))

    def step_metrics(self) -> dict:
        return self.train_step().metrics

    def train(self, steps: int | None = None, probe_every: int = 0, progress=None) -> list[dict]:
        """Run up to `steps` (default cfg.steps) steps; probes every `probe_every` steps and at the
        last, and logs each step."""
        hooks = []
        if probe_every:
            hooks.append(Hook(lambda step, metrics: metrics.update(probe_win_rate=self.probe_win_rate()),
                              every=probe_every))
        if self.log:
            hooks.append(Hook(lambda step, metrics: self.log(step, **metrics)))
        return self.fit(self.cfg.steps if steps is None else steps, hooks, progress)
