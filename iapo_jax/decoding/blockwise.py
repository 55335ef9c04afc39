"""Blockwise controlled decoding (CD paper, algorithms.md section 5).

From the shared prefix of each prompt, draw K continuations of M tokens from the base policy, score
each prefix with the scorer(s), keep the best, copy its cache into all K branches, and repeat until
every row has stopped or the length limit. Only the block's M cache slots differ between branches,
so the selection copies just those slots.

K = 1 is plain sampling with the same key (the same per-step uniforms, and selection is the
identity); M >= the response length is best-of-K with the scorer as reward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from iapo_jax.decoding.best_of_n import select
from iapo_jax.decoding.engine import decode_texts, open_frame, prepare_batch, trim, trimmed_responses
from iapo_jax.decoding.filters import DEFAULT_CAP
from iapo_jax.decoding.kl_bounds import blockwise_kl_bound
from iapo_jax.decoding.loop import DecodeRules, DecodeState, decode, plain_choice
from iapo_jax.decoding.settings import FrameConfig, SamplingConfig, resolve_settings
from iapo_jax.decoding.scorers import (
    as_scorer_set,
    block_scores,
    host_scores,
    host_weights,
    start_states,
    take_slots,
)


@struct.dataclass
class BlockwiseOutput:
    tokens: jax.Array  # [B, T] int32
    lengths: jax.Array  # [B]
    logprobs: jax.Array  # [B, T] under the base sampling policy, per token
    raw_logprobs: jax.Array  # [B, T] under the unfiltered temperature-1 base policy
    scores: jax.Array  # [B] weighted score of the final kept prefix
    kl_bound: np.ndarray = struct.field(pytree_node=False, default=None)  # [B] (log K-(K-1)/K)*ceil(L/M)
    blocks: int = struct.field(pytree_node=False, default=0)  # blocks decoded
    texts: tuple | None = struct.field(pytree_node=False, default=None)


def keep_winners(ds: DecodeState, sstates, kinds, winners, k: int, start, width: int, prompt_len: int):
    """Copy each prompt's winning branch into all k of its branches (block slots only)."""
    src = jnp.repeat(jnp.arange(winners.shape[0]) * k + winners, k)
    rows = lambda x: jnp.take(x, src, axis=0)  # noqa: E731
    # The policy cache holds P-1 prompt slots before the first generated column; value caches P.
    ds = ds.replace(cache=take_slots(ds.cache, src, prompt_len - 1 + start, width), pending=rows(ds.pending),
                    positions=rows(ds.positions), tokens=rows(ds.tokens), logprobs=rows(ds.logprobs),
                    raw_logprobs=rows(ds.raw_logprobs), lengths=rows(ds.lengths), finished=rows(ds.finished))
    new = []
    for entry, ss in zip(kinds, sstates):
        if ss is None:
            new.append(None)
            continue
        cache, last = ss
        new.append((take_slots(cache, src, prompt_len + start, width), rows(last)))
    return ds, tuple(new)


@functools.partial(jax.jit, static_argnames=("kinds", "slots", "n"))
def start_states_jit(kinds, states, ids, mask, *, slots: int, n: int):
    return start_states(kinds, states, ids, mask, slots, n)


def _decode_and_score(graphdef, state, ds, rules, ids, mask, kinds, states, sstates, start, k, width, cap):
    model = nnx.merge(graphdef, state)
    ds = decode(model, ds, rules, start + width, plain_choice(cap))
    parts, sstates = block_scores(kinds, states, sstates, jnp.repeat(ids, k, 0), jnp.repeat(mask, k, 0),
                                  ds.tokens, ds.lengths, start, width)
    return ds, sstates, parts


@functools.partial(jax.jit, static_argnames=("graphdef", "kinds", "k", "width", "cap"),
                   donate_argnames=("ds", "sstates"))
def block_step_jit(graphdef, state, ds, rules: DecodeRules, ids, mask, kinds, states, sstates, weights,
                   start, *, k: int, width: int, cap: int = DEFAULT_CAP):
    """One block with JAX scorers only: decode, score, select, and report whether all rows stopped."""
    ds, sstates, parts = _decode_and_score(graphdef, state, ds, rules, ids, mask, kinds, states, sstates,
                                           start, k, width, cap)
    total = (weights @ parts).reshape(-1, k)
    winners = select(total, worst=False)
    ds, sstates = keep_winners(ds, sstates, kinds, winners, k, start, width, ids.shape[1])
    best = jnp.take_along_axis(total, winners[:, None], 1)[:, 0]
    return ds, sstates, best, jnp.all(ds.finished)


@functools.partial(jax.jit, static_argnames=("graphdef", "kinds", "k", "width", "cap"),
                   donate_argnames=("ds", "sstates"))
def block_decode_jit(graphdef, state, ds, rules: DecodeRules, ids, mask, kinds, states, sstates,
                     start, *, k: int, width: int, cap: int = DEFAULT_CAP):
    """One block when some scorers run on the host: decode and JAX-score; selection comes after."""
    return _decode_and_score(graphdef, state, ds, rules, ids, mask, kinds, states, sstates, start, k,
                             width, cap)


@functools.partial(jax.jit, static_argnames=("kinds", "k", "width", "prompt_len"),
                   donate_argnames=("ds", "sstates"))
def keep_winners_jit(ds, sstates, winners, start, *, kinds, k: int, width: int, prompt_len: int):
    ds, sstates = keep_winners(ds, sstates, kinds, winners, k, start, width, prompt_len)
    return ds, sstates, jnp.all(ds.finished)


def blockwise_cd(model, prompts, scorers, *, k: int, block_size: int, weights=None,
                 sampling: SamplingConfig | None = None, frame: FrameConfig | None = None,
                 **settings) -> BlockwiseOutput:
    """Blockwise CD with K candidates of `block_size` (M) tokens per step.

    scorers: a prefix scorer (ValueModel, PrefixFn, or a Python scorer(prompts, partial responses))
    or a list of them / (scorer, weight) pairs; `weights` sets the weights at call time.
    sampling / frame, or their fields as keywords: see ``decoding.settings`` and ``engine.sample``.
    """
    sampling, frame = resolve_settings("blockwise_cd", sampling, frame, settings)
    tokenizer, cap = frame.tokenizer, frame.cap
    if int(k) < 1:
        raise ValueError(f"K (candidates per block) must be at least 1, got {k}.")
    if int(block_size) < 1:
        raise ValueError(f"M (block size) must be at least 1, got {block_size}.")
    k, width = int(k), int(block_size)
    sset = as_scorer_set(scorers, weights)
    if any(kind == "reward" for kind, _ in sset.kinds):
        raise TypeError("blockwise CD scores partial responses: pass a prefix scorer (ValueModel or "
                        "PrefixFn); a reward model fits best_of_n.")
    if sset.has_host and tokenizer is None:
        raise ValueError("a Python scorer scores text: pass tokenizer= so prefixes can be decoded.")
    batch = prepare_batch(model, prompts, sampling, frame)
    r_len = -(-batch.response_len // width) * width  # whole blocks fit the buffers
    p_len = batch.ids.shape[1]
    f = open_frame(model, batch, frame, n=k, response_len=r_len)
    graphdef, state, ds, rules = f.graphdef, f.state, f.ds, f.rules
    sstates = start_states_jit(sset.kinds, sset.states, batch.ids, batch.mask, slots=p_len + r_len, n=k)
    b = batch.real_rows
    best = jnp.zeros((batch.ids.shape[0],), jnp.float32)
    blocks = 0
    for blk in range(-(-batch.max_new_tokens // width)):
        start = blk * width
        blocks += 1
        if not sset.has_host:
            ds, sstates, best, done = block_step_jit(
                graphdef, state, ds, rules, batch.ids, batch.mask, sset.kinds, sset.states, sstates,
                sset.weights, start, k=k, width=width, cap=cap)
        else:
            ds, sstates, parts = block_decode_jit(graphdef, state, ds, rules, batch.ids, batch.mask,
                                                  sset.kinds, sset.states, sstates, start, k=k,
                                                  width=width, cap=cap)
            total = _host_total(sset, parts, ds, batch, tokenizer, k)
            winners = np.argmax(total, axis=1)
            best = jnp.asarray(total[np.arange(total.shape[0]), winners])
            ds, sstates, done = keep_winners_jit(ds, sstates, jnp.asarray(winners, jnp.int32), start,
                                                 kinds=sset.kinds, k=k, width=width, prompt_len=p_len)
        if bool(done):
            break
    # Every branch of a prompt now holds the same response: read branch 0.
    branch0 = trimmed_responses(ds, b, batch.max_new_tokens, stride=k)
    out = BlockwiseOutput(**branch0, scores=trim(best, b),
                          kl_bound=blockwise_kl_bound(k, np.asarray(branch0["lengths"]), width), blocks=blocks)
    if tokenizer is not None:
        out = out.replace(texts=decode_texts(tokenizer, out.tokens, out.lengths))
    return out


def _host_total(sset, parts, ds, batch, tokenizer, k: int) -> np.ndarray:
    """Weighted total of JAX and host scores for the real rows -> [prompts (incl. padding), k]."""
    rows_all = ds.lengths.shape[0]
    texts = decode_texts(tokenizer, ds.tokens, ds.lengths)
    prompts = [t for t in batch.prompt_texts for _ in range(k)]
    prompts += [prompts[0]] * (rows_all - len(prompts))  # mesh-padding rows reuse prompt 0
    hs = host_scores(sset.host, prompts, texts)
    total = host_weights(sset.host) @ hs
    if sset.has_jax:
        total = total + np.asarray(sset.weights) @ np.asarray(parts)
    return total.reshape(-1, k)
