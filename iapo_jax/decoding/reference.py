"""Teacher-forced log-probs of given responses under a (reference) model, in one forward pass.

The RL trainer needs log pi_ref(y|x) of the tokens the policy sampled. One forward over
[prompt, response] runs big matmuls (fast on CPU) instead of one skinny step per token; the LM head
is applied a chunk of response positions at a time so [rows, R, vocab] logits never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from iapo_jax.decoding.loop import prompt_positions


def response_logprobs(model, prompt_ids, prompt_mask, tokens, lengths, chunk: int = 8) -> jax.Array:
    """log p(tokens[:, j] | prompt, tokens[:, :j]) -> [rows, R] float32, 0 past each row's length.

    prompt_ids/prompt_mask [rows, P] left-padded; tokens [rows, R]; lengths [rows].
    """
    rows, p = prompt_ids.shape
    r = tokens.shape[1]
    resp_mask = jnp.arange(r)[None, :] < lengths[:, None]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), resp_mask], axis=1)
    h = model.hidden(ids, mask, prompt_positions(mask))
    h = lax.dynamic_slice_in_dim(h, p - 1, r, axis=1)  # position p-1+j predicts response token j
    chunk = max(c for c in range(1, min(chunk, r) + 1) if r % c == 0)
    hc = h.reshape(rows, r // chunk, chunk, -1).swapaxes(0, 1)  # [nc, rows, c, D]
    tc = tokens.reshape(rows, r // chunk, chunk).swapaxes(0, 1)

    def one(args):
        hh, tt = args
        logits = model.logits_from_hidden(hh)
        picked = jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    lp = lax.map(one, (hc, tc)).swapaxes(0, 1).reshape(rows, r)
    return jnp.where(resp_mask, lp, 0.0)
