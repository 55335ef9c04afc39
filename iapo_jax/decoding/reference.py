"""Teacher-forced log-probs of given responses under a (reference) model.

The RL trainer needs log pi(y|x) of the tokens the policy sampled, under the reference model and,
with gradients, under the policy being trained. Each prompt is run once into a KV cache that its n
responses share (as sampling does), then all responses run against it in one pass: big matmuls
(fast on CPU) instead of one skinny step per token, and no prompt computed n times. The LM head is
applied a chunk of response positions at a time so [rows, R, vocab] logits never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from iapo_jax.decoding.loop import prompt_positions


def response_logprobs(model, prompt_ids, prompt_mask, tokens, lengths, chunk: int = 8) -> jax.Array:
    """log p(tokens[:, j] | prompt, tokens[:, :j]) -> [rows, R] float32, 0 past each row's length.

    prompt_ids/prompt_mask [B, P] left-padded; tokens [B * n, R], the n responses of prompt b in
    rows b*n .. b*n+n-1 (n = 1: one prompt row per response); lengths [B * n].
    """
    b, p = prompt_ids.shape
    rows, r = tokens.shape
    if rows % b:
        raise ValueError(f"{rows} response rows are not a whole number of samples for {b} prompts; "
                         "give n responses per prompt, prompt-major (rows b*n .. b*n+n-1).")
    n = rows // b
    positions = prompt_positions(prompt_mask)
    cache = model.init_cache(b, p + r)
    h_prompt, cache = model.forward_cached(prompt_ids, positions, prompt_mask, cache)
    # Left padding puts every prompt's last real token in the last column: it predicts token 0.
    first, last_pos = h_prompt[:, -1], positions[:, -1]
    if n > 1:
        cache = cache.repeat(n)
        first, last_pos = jnp.repeat(first, n, axis=0), jnp.repeat(last_pos, n)
    resp_mask = jnp.arange(r)[None, :] < lengths[:, None]
    resp_pos = last_pos[:, None] + 1 + jnp.arange(r)[None, :]
    h_resp, _ = model.forward_cached(tokens, resp_pos, resp_mask, cache)
    h = jnp.concatenate([first[:, None], h_resp[:, :-1]], axis=1)  # h[:, j] predicts token j
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
