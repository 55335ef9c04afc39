"""Teacher-forced log-probabilities of response tokens: the differentiable half of RL training."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
    """Concatenate a left-padded prompt block and a right-padded response block.

    Positions come from the mask (cumsum - 1), so padding never shifts a row's positions and the
    result matches what the sampler saw while decoding.
    """
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return ids, mask, positions


def response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
    """Logits [B, R, V] that predict each response token; the LM head runs on those R positions only."""
    ids, mask, positions = join_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    hidden = model.hidden(ids, attention_mask=mask, positions=positions)
    start = prompt_ids.shape[1] - 1  # the last prompt slot predicts the first response token
    h = jax.lax.dynamic_slice_in_dim(hidden, start, response_ids.shape[1], axis=1)
    return model.logits_from_hidden(h)


def response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0):
    """log pi(y_t | x, y_<t) for each response token, zero at padding: [B, R]."""
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    tok = jnp.take_along_axis(logp, response_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(response_mask, tok, 0.0), logits
