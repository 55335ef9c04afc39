"""The decode loop every decoding mode shares: prefill once, then a `lax.while_loop` of
(forward the pending token, pick the next one) over a preallocated KV cache.

The state keeps the last picked token *pending* (not yet in the cache): the loop forwards exactly one
token per step and never forwards the final token it will not use. Blockwise CD selects and copies
rows of this state between blocks, then resumes the same loop.

Randomness: step t draws one uniform per row from `fold_in(key, t)`. Best-of-N, blockwise CD with
K = 1 and plain sampling therefore see the same uniforms for the same rows at the same step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from iapo_jax.decoding.filters import DEFAULT_CAP, SamplingParams, sample_next
from iapo_jax.models.kv_cache import KVCache


@struct.dataclass
class DecodeRules:
    """Per-call, per-row decoding settings: all traced, so new values never recompile."""

    params: SamplingParams
    stop_ids: jax.Array  # [B, S] int32; -1 pads a row's stop set
    max_new: jax.Array  # [B] int32: a row stops after this many tokens
    key: jax.Array  # PRNG key
    pad_id: jax.Array  # int32 scalar written after a row stops

    def repeat(self, n: int) -> "DecodeRules":
        rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
        return self.replace(params=self.params.repeat(n), stop_ids=rep(self.stop_ids),
                            max_new=rep(self.max_new))


@struct.dataclass
class DecodeState:
    cache: KVCache
    pending: jax.Array  # [B] int32: last token, not yet written to the cache
    positions: jax.Array  # [B] int32: position of `pending`
    tokens: jax.Array  # [B, R] int32, pad after a row stops
    logprobs: jax.Array  # [B, R] float32 under the sampling policy
    raw_logprobs: jax.Array  # [B, R] float32 under the temperature-1 unfiltered policy
    lengths: jax.Array  # [B] int32 tokens generated (the stop token included)
    finished: jax.Array  # [B] bool
    step: jax.Array  # int32 scalar: tokens picked so far (the same column for every row)
    aux: Any = None  # extra per-row state of a decoding mode (e.g. scorer caches)


def prompt_positions(mask: jax.Array) -> jax.Array:
    """Left-padded prompts: position = rank among the row's real tokens (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def start(model, prompt_ids, prompt_mask, response_len: int, pad_id, n: int = 1) -> DecodeState:
    """Prefill left-padded prompts [B, P] once, then broadcast each row to n branches."""
    b, p = prompt_ids.shape
    positions = prompt_positions(prompt_mask)
    cache = model.init_cache(b, p + response_len)
    # Left padding puts every row's last prompt token in the last column: it becomes `pending`.
    _, cache = model.forward_cached(prompt_ids[:, :-1], positions[:, :-1], prompt_mask[:, :-1], cache)
    pending, pos = prompt_ids[:, -1], positions[:, -1]
    if n > 1:
        cache = cache.repeat(n)
        pending, pos = jnp.repeat(pending, n), jnp.repeat(pos, n)
    rows = b * n
    return DecodeState(
        cache=cache,
        pending=pending.astype(jnp.int32),
        positions=pos.astype(jnp.int32),
        tokens=jnp.full((rows, response_len), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, response_len), jnp.float32),
        raw_logprobs=jnp.zeros((rows, response_len), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        finished=jnp.zeros((rows,), bool),
        step=jnp.zeros((), jnp.int32),
    )


def plain_choice(cap: int = DEFAULT_CAP) -> Callable:
    """The default pick: temperature / top-k / top-p / greedy sampling of the policy's logits."""

    def choose(model, logits, state, rules, u):
        tok, lp, raw = sample_next(logits, rules.params, u, cap=cap)
        return tok, lp, raw, state.aux

    return choose


def record(state: DecodeState, rules: DecodeRules, tok, lp, raw, aux) -> DecodeState:
    """Write the picked tokens into column `step`, then update lengths and stop flags."""
    active = ~state.finished
    tok = jnp.where(active, tok, rules.pad_id).astype(jnp.int32)
    lp = jnp.where(active, lp, 0.0)
    raw = jnp.where(active, raw, 0.0)
    col = (0, state.step)
    lengths = state.lengths + active
    stopped = active & jnp.any(tok[:, None] == rules.stop_ids, axis=-1)
    return state.replace(
        pending=tok,
        positions=state.positions + active,
        tokens=lax.dynamic_update_slice(state.tokens, tok[:, None], col),
        logprobs=lax.dynamic_update_slice(state.logprobs, lp[:, None], col),
        raw_logprobs=lax.dynamic_update_slice(state.raw_logprobs, raw[:, None], col),
        lengths=lengths,
        finished=state.finished | stopped | (lengths >= rules.max_new),
        step=state.step + 1,
        aux=aux,
    )


def next_logits(model, state: DecodeState):
    """Forward the pending token of every unfinished row -> (logits [B, V] float32, new cache)."""
    h, cache = model.forward_cached(state.pending[:, None], state.positions[:, None],
                                    (~state.finished)[:, None], state.cache)
    return model.logits_from_hidden(h[:, 0]), cache


def decode(model, state: DecodeState, rules: DecodeRules, until, choose: Callable) -> DecodeState:
    """Pick tokens for columns state.step .. until-1, stopping early once every row has finished."""
    rows = state.pending.shape[0]

    def cond(s):
        return (s.step < until) & ~jnp.all(s.finished)

    def body(s):
        logits, cache = next_logits(model, s)
        s = s.replace(cache=cache)
        u = jax.random.uniform(jax.random.fold_in(rules.key, s.step), (rows,))
        return record(s, rules, *choose(model, logits, s, rules, u))

    return lax.while_loop(cond, body, state)
