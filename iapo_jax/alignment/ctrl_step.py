"""The jit-compiled CTRL policy update: a pure function of (trainable, frozen, batch).

Full fine-tuning trains the whole parameter state; LoRA trains low-rank factors applied beside the
frozen base inside the step (models.low_rank). beta, clip epsilon and the learning-rate schedule
position are traced values, so sweeping them never recompiles. With a mesh, the step runs sharded:
parameters and optimizer state by their logical names, the rollout rows over data x fsdp
(iapo_jax.parallel).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from iapo_jax.alignment import losses
from iapo_jax.alignment.trainer import make_update_step
from iapo_jax.decoding.reference import response_logprobs
from iapo_jax.models import lora


@struct.dataclass
class RolloutBatch:
    # [B, Tp] left-padded, one row per response; or [B / n, Tp], one row per prompt whose n
    # responses sit in consecutive rows (the prompt then runs once for all of them).
    prompt_ids: jax.Array
    prompt_mask: jax.Array  # like prompt_ids, bool
    tokens: jax.Array  # [B, R] sampled response tokens
    lengths: jax.Array  # [B] response lengths, stop token included
    advantages: jax.Array  # [B]
    old_logp: jax.Array  # [B, R] log pi_old(y_t) (for the PPO ratio)
    ref_logp: jax.Array  # [B, R] log pi_ref(y_t) (for a KL term in the loss)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static choices that change the program (a change recompiles, by design)."""

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_merged_update: bool = False  # merge the factors before the loss's forward (forms the frozen
    # kernels' full gradients; slower, kept to measure the factored path against)
    kl_in_loss: bool = False  # False: KL is a k1 penalty in the reward (classic RLOO)
    kl_estimator: str = "k2"  # used when kl_in_loss; only "k2" has the KL's gradient there

    def __post_init__(self):
        if self.kl_in_loss:
            losses.check_kl_loss_estimator(self.kl_estimator)
    use_clip: bool = False  # PPO-clip ratio objective


def policy_state(frozen: nnx.State, trainable: Any, opts: StepOptions, factored: bool = False) -> nnx.State:
    """The policy's state. factored: LoRA factors stay beside the frozen kernels (for the loss,
    whose backward then skips the frozen kernels' gradients); otherwise they are merged in."""
    if opts.lora_rank:
        attach = lora.attach_lora if factored else lora.merge_lora
        return attach(frozen, trainable, opts.lora_alpha, opts.lora_rank)
    return trainable


def policy_loss(graphdef, opts: StepOptions):
    """loss(trainable, frozen, batch, beta, clip_eps) -> (loss, metrics), pure: the policy-gradient
    loss on a RolloutBatch (with the KL term when opts.kl_in_loss)."""

    def loss_fn(trainable, frozen, batch: RolloutBatch, beta, clip_eps):
        model = nnx.merge(graphdef, policy_state(frozen, trainable, opts, factored=not opts.lora_merged_update))
        logp = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.lengths)
        real = jnp.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
        mask = real.astype(jnp.float32)
        pg = losses.policy_gradient_loss(
            logp, batch.old_logp, batch.advantages, mask, clip_eps if opts.use_clip else None
        )
        kl = losses.kl_loss_term(logp, batch.ref_logp, mask)
        loss = pg + beta * kl if opts.kl_in_loss else pg
        ratio = jnp.exp(logp - batch.old_logp)
        clipped = (jnp.abs(ratio - 1.0) > clip_eps) & real
        metrics = {
            "loss": loss,
            "pg_loss": pg,
            "kl_loss_estimate": kl,
            # -log pi of on-policy tokens: an unbiased per-token entropy estimate, no [B,R,V] logits.
            "entropy": -jnp.sum(jax.lax.stop_gradient(logp) * mask) / jnp.maximum(jnp.sum(mask), 1.0),
            "clip_fraction": jnp.sum(clipped) / jnp.maximum(jnp.sum(mask), 1.0),
        }
        return loss, metrics

    return loss_fn


def make_train_step(graphdef, optimizer: optax.GradientTransformation, opts: StepOptions, mesh=None):
    """Returns step(trainable, frozen, opt_state, batch, beta, clip_eps) -> (trainable, opt_state, metrics).

    mesh: run sharded on it; place the state first with parallel.sharded_step.shard_train_state.
    The batch is split over data x fsdp by the step itself (rows must divide evenly).
    """
    return make_update_step(policy_loss(graphdef, opts), optimizer, mesh)


def sequence_rewards_to_advantages(rewards, logp, ref_logp, mask, beta, samples_per_prompt,
                                   kl_in_loss: bool, estimator: str = "rloo"):
    """[B] task rewards -> [B] advantages, with the k1 KL penalty folded in unless it is in the loss."""
    shaped = rewards if kl_in_loss else losses.kl_penalised_rewards(rewards, logp, ref_logp, mask, beta)
    grouped = shaped.reshape(-1, samples_per_prompt)
    return losses.get_advantage_estimator(estimator)(grouped).reshape(-1)
