"""Scorers for best-of-N and controlled decoding, and their weighted combination.

A scorer is one of
- a value model (`ValueModel`: an NNX module with `values_cached`), scored on its own KV cache;
- a reward model (an NNX module with `score(ids, mask) -> [B]`), for complete responses;
- `PrefixFn(fn)`: any JAX function fn(ids [B, T], mask [B, T]) -> [B] of the whole sequence so far;
- a Python scorer on strings: an object with `score(prompts, responses)` (the reward protocol) or a
  plain callable with that signature, run on the host between compiled calls.
JAX scorers run inside the compiled decoding programs. Several scorers combine as
sum_i weight_i * score_i with weights given at call time (traced: new weights never recompile),
which is the CD paper's multi-objective control without retraining.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from iapo_jax.decoding.loop import prompt_positions

VALUE, REWARD, FN = "value", "reward", "fn"


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixFn:
    """A JAX scorer of full sequences: fn(ids [B, T], mask [B, T] bool) -> float32 [B]."""

    fn: Callable[[jax.Array, jax.Array], jax.Array]
    name: str = "prefix_fn"

    def __call__(self, ids, mask):
        return self.fn(ids, mask)


@dataclasses.dataclass(frozen=True)
class ScorerSet:
    """Scorers split into the JAX part (compiled) and the host part (Python on strings)."""

    kinds: tuple  # static per JAX scorer: (kind, graphdef-or-PrefixFn)
    states: tuple  # traced per JAX scorer: nnx state or None
    weights: jax.Array  # [num_jax] float32, traced
    host: tuple  # ((callable(prompts, responses), weight, name), ...)
    names: tuple  # JAX names, then host names

    @property
    def has_host(self) -> bool:
        return bool(self.host)

    @property
    def has_jax(self) -> bool:
        return bool(self.kinds)


def _kind(scorer) -> str:
    if isinstance(scorer, PrefixFn):
        return FN
    if isinstance(scorer, nnx.Module):
        if hasattr(scorer, "values_cached"):
            return VALUE
        if hasattr(scorer, "score"):
            return REWARD
        raise TypeError(f"{type(scorer).__name__} is an NNX module without `values_cached` or `score`; "
                        "pass a ValueModel, a RewardModel, PrefixFn(fn) or a Python scorer.")
    if hasattr(scorer, "score") or callable(scorer):
        return "host"
    raise TypeError(f"cannot use {scorer!r} as a scorer; pass a ValueModel, a RewardModel, "
                    "PrefixFn(fn), an object with score(prompts, responses), or such a callable.")


def as_scorer_set(scorers, weights=None) -> ScorerSet:
    """One scorer, a list of scorers, or a list of (scorer, weight) pairs; `weights` overrides."""
    items = list(scorers) if isinstance(scorers, (list, tuple)) else [scorers]
    if not items:
        raise ValueError("no scorer given; pass at least one scorer or reward.")
    pairs = [it if isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], (int, float, np.number))
             else (it, 1.0) for it in items]
    if weights is not None:
        w = np.asarray(weights, np.float64).reshape(-1)
        if w.shape[0] != len(pairs):
            raise ValueError(f"{w.shape[0]} weights for {len(pairs)} scorers; give one weight per scorer.")
        pairs = [(s, float(x)) for (s, _), x in zip(pairs, w)]
    kinds, states, jw, host, jnames, hnames = [], [], [], [], [], []
    for i, (s, w) in enumerate(pairs):
        if not np.isfinite(w):
            raise ValueError(f"weight of scorer {i} is {w}; weights must be finite.")
        kind = _kind(s)
        name = getattr(s, "name", None) or type(s).__name__
        if kind == "host":
            fn = s.score if hasattr(s, "score") and not isinstance(s, type) else s
            host.append((fn, float(w), str(name)))
            hnames.append(str(name))
        elif kind == FN:
            kinds.append((FN, s))
            states.append(None)
            jw.append(w)
            jnames.append(s.name)
        else:
            graphdef, state = nnx.split(s)
            kinds.append((kind, graphdef))
            states.append(state)
            jw.append(w)
            jnames.append(str(name))
    return ScorerSet(kinds=tuple(kinds), states=tuple(states), weights=jnp.asarray(jw, jnp.float32),
                     host=tuple(host), names=tuple(jnames + hnames))


def _merge(kind_entry, state):
    kind, obj = kind_entry
    return obj if kind == FN else nnx.merge(obj, state)


def _stack(parts, *shape) -> jax.Array:
    """[num_jax, *shape] float32; an empty [0, *shape] when every scorer runs on the host."""
    if not parts:
        return jnp.zeros((0, *shape), jnp.float32)
    return jnp.stack([p.astype(jnp.float32) for p in parts])


def full_sequence(prompt_ids, prompt_mask, tokens, lengths):
    """[prompt, response] ids and mask for scoring whole sequences (prompts already row-repeated)."""
    resp_mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return (jnp.concatenate([prompt_ids, tokens], 1),
            jnp.concatenate([prompt_mask.astype(bool), resp_mask], 1))


def final_scores(kinds, states, prompt_ids, prompt_mask, tokens, lengths) -> jax.Array:
    """Each JAX scorer on complete sequences -> [num_jax, rows] (value models: last real token)."""
    ids, mask = full_sequence(prompt_ids, prompt_mask, tokens, lengths)
    out = []
    for entry, state in zip(kinds, states):
        m = _merge(entry, state)
        if entry[0] == VALUE:
            v = m.values(ids, mask, prompt_positions(mask))
            last = prompt_ids.shape[1] + jnp.maximum(lengths, 1) - 1
            out.append(jnp.take_along_axis(v, last[:, None], 1)[:, 0])
        elif entry[0] == REWARD:
            out.append(m.score(ids, mask))
        else:
            out.append(m(ids, mask))
    return _stack(out, ids.shape[0])


# ----------------------------------------------------------------------------------------------
# Incremental scoring for controlled decoding (value models keep their own KV cache)
# ----------------------------------------------------------------------------------------------


def start_states(kinds, states, prompt_ids, prompt_mask, slots: int, n: int):
    """Prefill each value model's cache with the whole prompt, broadcast to n rows per prompt.

    Returns one entry per JAX scorer: (cache, last value [rows]) for value models, None otherwise.
    """
    out = []
    for entry, state in zip(kinds, states):
        if entry[0] == REWARD:
            raise TypeError("a reward model scores complete responses only; controlled decoding needs "
                            "a prefix scorer (ValueModel or PrefixFn).")
        if entry[0] != VALUE:
            out.append(None)
            continue
        m = _merge(entry, state)
        cache = m.init_cache(prompt_ids.shape[0], slots)
        v, cache = m.values_cached(prompt_ids, prompt_positions(prompt_mask), prompt_mask, cache)
        last = v[:, -1]
        if n > 1:
            cache, last = cache.repeat(n), jnp.repeat(last, n)
        out.append((cache, last))
    return tuple(out)


def block_scores(kinds, states, sstates, prompt_ids, prompt_mask, tokens, lengths, start, width: int):
    """Score every row's prefix after a block of `width` columns beginning at `start`.

    Value models read the block's tokens into their cache and report the value at the row's last
    real token (a row that had already stopped keeps its previous value). -> ([num_jax, rows], sstates)
    """
    scores, new = [], []
    prompt_len = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    cols = start + jnp.arange(width)
    for entry, state, ss in zip(kinds, states, sstates):
        m = _merge(entry, state)
        if entry[0] == VALUE:
            cache, prev = ss
            block = lax.dynamic_slice_in_dim(tokens, start, width, axis=1)
            real = cols[None, :] < lengths[:, None]
            v, cache = m.values_cached(block, prompt_len[:, None] + cols[None, :], real, cache)
            last = lengths - 1 - start
            got = (last >= 0) & (last < width)
            val = jnp.where(got, jnp.take_along_axis(v, jnp.clip(last, 0, width - 1)[:, None], 1)[:, 0], prev)
            scores.append(val)
            new.append((cache, val))
        else:
            ids, mask = full_sequence(prompt_ids, prompt_mask, tokens, lengths)
            scores.append(m(ids, mask).astype(jnp.float32))
            new.append(None)
    return _stack(scores, tokens.shape[0]), tuple(new)


def candidate_values(kinds, states, sstates, prompt_ids, prompt_mask, tokens, lengths, step,
                     positions, active, candidates):
    """Values of every row's prefix extended by each of its k candidates -> ([num_jax, B, k], sstates).

    Value-model caches hold k copies of each row; candidate j goes to copy j in one batched call.
    """
    b, k = candidates.shape
    out, new = [], []
    for entry, state, ss in zip(kinds, states, sstates):
        m = _merge(entry, state)
        if entry[0] == VALUE:
            cache, _ = ss
            flat = candidates.reshape(b * k, 1)
            pos = jnp.repeat(positions + 1, k)[:, None]
            v, cache = m.values_cached(flat, pos, jnp.repeat(active, k)[:, None], cache)
            out.append(v.reshape(b, k))
            new.append((cache, v.reshape(b * k)))
        else:
            cand_tokens = jnp.repeat(tokens, k, axis=0)
            cand_tokens = lax.dynamic_update_slice(cand_tokens, candidates.reshape(b * k, 1), (0, step))
            cand_len = jnp.repeat(jnp.where(active, lengths + 1, lengths), k)
            ids, mask = full_sequence(jnp.repeat(prompt_ids, k, 0), jnp.repeat(prompt_mask, k, 0),
                                      cand_tokens, cand_len)
            out.append(m(ids, mask).astype(jnp.float32).reshape(b, k))
            new.append(None)
    return _stack(out, b, k), tuple(new)


def commit_candidates(kinds, sstates, choice):
    """Keep the chosen candidate: copy its newest cache slot into all k copies of the row."""
    new = []
    for entry, ss in zip(kinds, sstates):
        if entry[0] != VALUE:
            new.append(ss)
            continue
        cache, v = ss
        rows = cache.k.shape[1]
        k = rows // choice.shape[0]
        src = jnp.repeat(jnp.arange(choice.shape[0]) * k + choice, k)
        cache = take_slots(cache, src, cache.index - 1, 1)
        new.append((cache, jnp.take(v, src)))
    return tuple(new)


def take_slots(cache, rows, start, width: int):
    """cache.take(rows) restricted to slots start .. start+width-1 (the rest is shared by the rows)."""
    def pick(x, axis_rows, axis_slots):
        part = lax.dynamic_slice_in_dim(x, start, width, axis=axis_slots)
        part = jnp.take(part, rows, axis=axis_rows)
        return lax.dynamic_update_slice_in_dim(x, part, start, axis=axis_slots)

    return cache.replace(k=pick(cache.k, 1, 2), v=pick(cache.v, 1, 2), valid=pick(cache.valid, 0, 1))


# ----------------------------------------------------------------------------------------------
# Host scorers
# ----------------------------------------------------------------------------------------------


def host_scores(host, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Run each Python scorer on (prompt, response) strings -> [num_host, n], validated."""
    n = len(responses)
    out = []
    for fn, _, name in host:
        raw = fn(list(prompts), list(responses))
        try:
            arr = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"scorer {name!r} returned {type(raw).__name__}, not numbers; it must "
                             f"return {n} floats, one per response.") from None
        if arr.shape != (n,):
            raise ValueError(f"scorer {name!r} returned {arr.size} scores (shape {arr.shape}) for {n} "
                             f"responses; it must return exactly one score per response.")
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"scorer {name!r} returned {int(bad.sum())} NaN/inf score(s) (first at "
                             f"response {i}: {arr[i]}); fix the scorer so every score is finite.")
        out.append(arr)
    return np.stack(out).astype(np.float32)


def host_weights(host) -> np.ndarray:
    return np.asarray([w for _, w, _ in host], np.float32)

