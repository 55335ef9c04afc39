"""Pure loss functions and estimators for KL-regularised RL, reward models and prefix scorers.

Every function here is a plain function of arrays: jit-able, differentiable where it makes sense,
and free of model code, so trainers compose them and tests check them against closed forms.
Shapes: P prompts, n samples per prompt, B = P * n rows, R response tokens.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from iapo_jax.runtime.registry import Registry

KL_ESTIMATORS: Registry[Callable] = Registry("KL estimator")
ADVANTAGE_ESTIMATORS: Registry[Callable] = Registry("advantage estimator")


def get_kl_estimator(name: str) -> Callable:
    return KL_ESTIMATORS.get(name)


def get_advantage_estimator(name: str) -> Callable:
    return ADVANTAGE_ESTIMATORS.get(name)


# --- KL estimators (Schulman's k1/k2/k3), per token, for y ~ pi: log r = log pi - log pi_ref ---


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Unbiased, high variance, can be negative per sample."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Biased, low variance; its gradient is the KL gradient for on-policy samples."""
    return 0.5 * jnp.square(logp - ref_logp)


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Unbiased and non-negative: exp(-d) - 1 + d with d = log pi - log pi_ref."""
    d = logp - ref_logp
    return jnp.expm1(-d) + d


def sequence_kl(logp, ref_logp, mask, estimator: str = "k1") -> jax.Array:
    """Sum of per-token KL estimates over the real response tokens of each row: [B, R] -> [B]."""
    per_token = get_kl_estimator(estimator)(logp, ref_logp)
    return jnp.sum(per_token * mask, axis=-1)


# --- Advantage estimators on [P, n] sequence rewards ---


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out: each sample's baseline is the mean of the other n-1 samples."""
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt; set samples_per_prompt >= 2")
    total = jnp.sum(rewards, axis=-1, keepdims=True)
    baseline = (total - rewards) / (n - 1)
    return rewards - baseline


@ADVANTAGE_ESTIMATORS.register("grpo")
def group_normalised_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Group mean/std normalisation (GRPO-style); an alternative to RLOO."""
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    std = jnp.std(rewards, axis=-1, keepdims=True)
    return (rewards - mean) / (std + eps)


@ADVANTAGE_ESTIMATORS.register("reinforce")
def plain_advantages(rewards: jax.Array) -> jax.Array:
    """No baseline (for tests and ablations)."""
    return rewards


# --- Policy-gradient losses ---


def policy_gradient_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float | jax.Array | None = None,
) -> jax.Array:
    """Sequence-level policy gradient with an optional PPO clip, averaged over rows.

    logp, old_logp, mask: [B, R]; advantages: [B] (one per sequence, broadcast over its tokens).
    With clip_eps=None and logp == old_logp this is REINFORCE: grad = -E[A * grad log pi(y)].
    """
    adv = jax.lax.stop_gradient(advantages)[:, None]
    ratio = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
    unclipped = ratio * adv
    if clip_eps is None:
        per_token = unclipped
    else:
        clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        per_token = jnp.minimum(unclipped, clipped)
    # Token sums per sequence: the sequence log-prob is the sum of token log-probs.
    return -jnp.mean(jnp.sum(per_token * mask, axis=-1))


def kl_penalised_rewards(rewards, logp, ref_logp, mask, beta) -> jax.Array:
    """R(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) per sequence, with the log ratio detached.

    Maximising its expectation under pi is maximising E[R] - beta * KL(pi || pi_ref) (the k1
    estimator is unbiased for the sequence KL), so RLOO on these rewards solves the CTRL objective.
    """
    log_ratio = jax.lax.stop_gradient(sequence_kl(logp, ref_logp, mask, "k1"))
    return rewards - beta * log_ratio


# KL in the loss. Differentiating a per-token estimate with the samples held fixed does not give
# the gradient of KL(pi || pi_ref): k1's expected gradient is E[grad log pi] = 0, k3's is the
# gradient of the reverse KL(pi_ref || pi), and any per-token form misses the credit that a token
# gets for the KL of the tokens after it. The sequence-level k2 surrogate 1/2 (sum_t d_t)^2 has
# gradient (sum_t d_t) * grad log pi(y), whose expectation under y ~ pi is exactly grad KL(pi || pi_ref)
# (see e.g. Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL").
KL_LOSS_ESTIMATORS = ("k2",)


def check_kl_loss_estimator(estimator: str) -> None:
    """Only estimators whose gradient is the KL's gradient may go into the loss."""
    if estimator not in KL_LOSS_ESTIMATORS:
        why = {"k1": "its expected gradient is zero",
               "k3": "its gradient is that of the reverse KL(pi_ref || pi)"}.get(estimator, "it is unknown")
        raise ValueError(
            f"kl_estimator {estimator!r} cannot be put in the loss: {why}. Use kl_estimator='k2' (the "
            "sequence-level squared log-ratio, whose gradient is the KL's) or keep the KL in the reward "
            "(kl_in_loss=False)")


def kl_loss_term(logp, ref_logp, mask, estimator: str = "k2") -> jax.Array:
    """Mean over rows of 1/2 (log pi(y) - log pi_ref(y))^2, the sequence-level k2 surrogate.

    For on-policy samples its gradient is an unbiased estimate of grad KL(pi || pi_ref) over whole
    sequences, so adding beta times it to a policy-gradient loss optimises E[R] - beta * KL.
    """
    check_kl_loss_estimator(estimator)
    log_ratio = jnp.sum((logp - ref_logp) * mask, axis=-1)
    return jnp.mean(0.5 * jnp.square(log_ratio))


def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean per-token entropy of the policy over real tokens; logits [B, R, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# --- Reward model ---


def bradley_terry_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    margin: jax.Array | float = 0.0,
    center_coef: float = 0.0,
) -> jax.Array:
    """-log sigmoid(r_chosen - r_rejected - margin), plus an optional centering penalty.

    center_coef * mean((r_c + r_r)^2) pins the reward's free offset near zero (as in several
    open reward-model recipes) without changing any pairwise preference.
    """
    loss = -jnp.mean(jax.nn.log_sigmoid(chosen - rejected - margin))
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(chosen + rejected))
    return loss


def pairwise_accuracy(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
    """Fraction of pairs ranked correctly; ties count one half."""
    return jnp.mean(jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0)))


# --- Prefix scorers (CD paper, arXiv 2310.17022) ---


def cd_fudge_loss(values: jax.Array, final_reward: jax.Array, mask: jax.Array) -> jax.Array:
    """1/2 sum_t (V([x, y^t]) - r(x, y))^2 over real prefixes, averaged over rows.

    values, mask: [B, T] (one value per prefix); final_reward: [B] from on-policy rollouts.
    """
    err = values - jax.lax.stop_gradient(final_reward)[:, None]
    return 0.5 * jnp.mean(jnp.sum(jnp.square(err) * mask, axis=-1))


def cd_q_targets(
    next_values: jax.Array,
    next_probs: jax.Array,
    final_reward: jax.Array,
    is_last: jax.Array,
) -> jax.Array:
    """Bellman targets v_t = sum_z pi_ref(z | x, y^t) V([x, y^t, z]), or r(x, y) at the EOS prefix.

    next_values, next_probs: [B, T, k] over k candidate next tokens (k = vocabulary is exact; a
    top-k truncation passes renormalised probabilities); final_reward: [B]; is_last: [B, T] bool
    marking the prefix that ends the response. Returned targets carry no gradient.
    """
    expected = jnp.sum(next_probs * next_values, axis=-1)
    target = jnp.where(is_last, final_reward[:, None], expected)
    return jax.lax.stop_gradient(target)


def cd_q_loss(values, next_values, next_probs, final_reward, is_last, mask) -> jax.Array:
    """1/2 sum_t (V([x, y^t]) - stopgrad(v_t))^2 with the CD-Q targets above; works off-policy."""
    target = cd_q_targets(next_values, next_probs, final_reward, is_last)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(values - target) * mask, axis=-1))


def renormalised_top_k(logits: jax.Array, k: int):
    """Top-k next tokens of pi_ref with probabilities renormalised over them: ([..., k], [..., k])."""
    top_logits, top_ids = jax.lax.top_k(logits.astype(jnp.float32), k)
    return top_ids, jax.nn.softmax(top_logits, axis=-1)
