"""The same trainer driven by the exact expected gradient instead of sampled rollouts.

With every response enumerated, the policy gradient of E_pi[Phi - beta * log(pi / pi_ref)] is a sum
over all responses. Feeding the trainer's own compiled step a rollout batch that holds every
response once, with advantage Y * pi(y) * (shaped(y) - E_pi[shaped]), makes its loss gradient equal
to that exact gradient (the step averages over rows), so the run keeps Adam, clipping, the schedule
and the model, and removes only the sampling noise. Comparing it with a sampled run separates
"the estimator is too noisy" from "the optimisation itself is slow or stiff".
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from iapo_jax.alignment.ctrl_step import RolloutBatch
from iapo_jax.decoding.inputs import prepare
from iapo_jax.testbed import exact


def fixed_rows(setting):
    """The parts of the all-responses batch that never change: prompts (prepared as the trainer
    prepares them), every response once per prompt, and their lengths."""
    batch = prepare(setting.reference, list(setting.prompts), max_new_tokens=setting.spec.response_len,
                    tokenizer=setting.tokenizer, key=0)
    p, l = setting.spec.num_prompts, setting.spec.response_len
    rows = p * setting.responses.shape[0]
    return (batch.ids, batch.mask, jnp.asarray(np.tile(setting.responses, (p, 1))),
            jnp.full((rows,), l, jnp.int32))


def exact_rollout(trainer, setting, phi: np.ndarray, ref_logp: np.ndarray, fixed=None) -> tuple[RolloutBatch, np.ndarray]:
    """A rollout batch over every response whose policy-gradient loss has the exact gradient."""
    ids, mask, tokens, lengths = fixed_rows(setting) if fixed is None else fixed
    tok_logp = exact.token_log_probs(trainer.current_policy(), setting)  # [P, Y, L]
    logp = exact.normalise_log(np.sum(tok_logp.astype(np.float64), axis=-1))
    shaped = phi - trainer.beta * (logp - ref_logp)
    pi = np.exp(logp)
    centred = shaped - np.sum(pi * shaped, axis=-1, keepdims=True)
    adv = (setting.responses.shape[0] * pi * centred).reshape(-1).astype(np.float32)
    per_token = jnp.asarray(tok_logp.reshape(tokens.shape))
    # old_logp = the current per-token log-probs: the PPO ratio is 1 and the loss gradient is
    # sum_y adv(y) grad log pi(y) / rows. ref_logp only feeds a KL-in-loss term, unused here.
    rollout = RolloutBatch(prompt_ids=ids, prompt_mask=mask, tokens=tokens, lengths=lengths,
                           advantages=jnp.asarray(adv), old_logp=per_token, ref_logp=per_token)
    return rollout, logp


def train_on_expected_gradient(trainer, setting, phi, ref_logp, steps: int, every: int = 50,
                               log=None) -> list[dict]:
    """`steps` updates of the trainer on the exact gradient; returns (step, KL, KL to optimum) points."""
    opt = exact.tilted(ref_logp, phi, trainer.beta)
    fixed = fixed_rows(setting)
    points = []
    for step in range(steps + 1):
        rollout, logp = exact_rollout(trainer, setting, phi, ref_logp, fixed)
        if step % every == 0 or step == steps:
            point = {"step": step, "kl": float(np.mean(exact.kl_per_prompt(logp, ref_logp))),
                     "kl_to_optimum": float(np.mean(exact.kl_per_prompt(logp, opt)))}
            points.append(point)
            if log:
                log(f"  exact-gradient step {step:4d}  KL {point['kl']:.4f}  KL(pi||pi_opt) {point['kl_to_optimum']:.2e}")
        if step < steps:
            trainer.update(rollout)
    return points
