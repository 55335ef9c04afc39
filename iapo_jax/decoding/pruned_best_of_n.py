"""Early-pruned best-of-N (the speculative-rejection idea, arXiv 2410.20290).

Start N branches per prompt from one shared prefill. At each checkpoint of a schedule (a response
length in tokens), score the partial responses with a prefix scorer, keep the best `keep` branches
of each prompt and compact the decoding state to those rows, so every later step costs only the
survivors. After the last checkpoint the survivors run to the end; the final reward picks one.

Branch i of prompt b draws the same per-step uniforms as row b*N + i of full best-of-N with the same
key, so every survivor is the response full best-of-N would have sampled in that branch: the
pruned result is best-of-N restricted to the survivors, and comparisons with full best-of-N are
paired by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from iapo_jax.decoding.best_of_n import ServedResponse, final_scores_jit, select
from iapo_jax.decoding.blockwise import start_states_jit
from iapo_jax.decoding.engine import (
    decode_texts,
    open_frame,
    prepare_batch,
    response_texts,
    trim,
    trimmed_responses,
)
from iapo_jax.decoding.filters import DEFAULT_CAP, sample_next
from iapo_jax.decoding.loop import DecodeRules, DecodeState, decode
from iapo_jax.decoding.scorers import (
    as_scorer_set,
    block_scores,
    host_scores,
    host_weights,
)
from iapo_jax.decoding.settings import FrameConfig, SamplingConfig, resolve_settings
from iapo_jax.decoding.sharding import constrain_rows


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """Prune at these response lengths (tokens), keeping this many branches per prompt at each."""

    checkpoints: tuple[int, ...] = ()
    keep: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "PruneSchedule":
        """'8:8,16:4' -> prune to 8 branches after 8 tokens, then to 4 after 16 ('' or 'none': none)."""
        text = text.strip()
        if text in ("", "none"):
            return cls()
        pairs = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", part)
            if m is None:
                raise ValueError(f"pruning schedule {text!r}: {part!r} is not TOKENS:KEEP; write e.g. "
                                 "'8:8,16:4' (after 8 tokens keep 8 branches, after 16 keep 4)")
            pairs.append((int(m.group(1)), int(m.group(2))))
        return cls(tuple(c for c, _ in pairs), tuple(k for _, k in pairs))

    @classmethod
    def from_fractions(cls, n: int, checkpoints: Sequence[int], keep_fraction: float) -> "PruneSchedule":
        """At each checkpoint keep ceil(fraction * survivors) branches (at least one)."""
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        keep, alive = [], int(n)
        for _ in checkpoints:
            alive = max(1, math.ceil(alive * keep_fraction - 1e-9))
            keep.append(alive)
        return cls(tuple(int(c) for c in checkpoints), tuple(keep))

    def check(self, n: int, max_new_tokens: int) -> None:
        """Raise ValueError naming the problem and the fix; called before any compute."""
        if len(self.checkpoints) != len(self.keep):
            raise ValueError(f"pruning schedule has {len(self.checkpoints)} checkpoints but "
                             f"{len(self.keep)} keep counts; give one keep count per checkpoint")
        alive, last = int(n), 0
        for c, k in zip(self.checkpoints, self.keep):
            if k < 1:
                raise ValueError(f"pruning schedule keeps {k} branches after {c} tokens; every "
                                 "checkpoint must keep at least 1 branch")
            if k > alive:
                raise ValueError(f"pruning schedule keeps {k} branches after {c} tokens but only "
                                 f"{alive} are alive then; keep counts must not grow (N = {n})")
            if c <= last:
                raise ValueError(f"pruning checkpoints must be increasing and at least 1 token, got "
                                 f"{list(self.checkpoints)}")
            if c >= max_new_tokens:
                raise ValueError(f"pruning checkpoint {c} is not before the response length "
                                 f"{max_new_tokens}; prune at fewer tokens or raise max_new_tokens")
            alive, last = k, c

    def __str__(self) -> str:
        return ",".join(f"{c}:{k}" for c, k in zip(self.checkpoints, self.keep)) or "none"


@struct.dataclass
class PrunedBestOfNOutput(ServedResponse):
    """The surviving branches of each prompt, their final scores, and the chosen one."""

    tokens: jax.Array  # [B, M, T] int32, M = branches alive at the end
    lengths: jax.Array  # [B, M]
    logprobs: jax.Array  # [B, M, T]
    raw_logprobs: jax.Array  # [B, M, T]
    scores: jax.Array  # [B, M] weighted final reward of the survivors
    branch: jax.Array  # [B, M] each survivor's branch index among the N (its full best-of-N row)
    chosen: jax.Array  # [B] index into the survivors
    prefix_scores: tuple = ()  # per checkpoint: [B, alive] prefix scores of the branches alive then
    generated_tokens: np.ndarray = struct.field(pytree_node=False, default=None)  # [B] all branches
    decoded_rows: int = struct.field(pytree_node=False, default=0)  # sum over steps of rows decoded
    texts: tuple | None = struct.field(pytree_node=False, default=None)  # [B][M]

    @property
    def best_branch(self) -> jax.Array:
        """[B] the served response's branch index among the N of full best-of-N."""
        return jnp.take_along_axis(self.branch, self.chosen[:, None], 1)[:, 0]


def branch_choice(full_rows: int, cap: int):
    """Sample with the uniform full best-of-N would draw for this row's branch (state.aux = branch row)."""

    def choose(model, logits, state, rules, u):
        u = jax.random.uniform(jax.random.fold_in(rules.key, state.step), (full_rows,))[state.aux]
        tok, lp, raw = sample_next(logits, rules.params, u, cap=cap)
        return tok, lp, raw, state.aux

    return choose


@functools.partial(jax.jit, static_argnames=("graphdef", "full_rows", "cap"), donate_argnames=("dstate",))
def branch_decode_jit(graphdef, state, dstate, rules: DecodeRules, until, *, full_rows: int,
                      cap: int = DEFAULT_CAP):
    model = nnx.merge(graphdef, state)
    return decode(model, dstate, rules, until, branch_choice(full_rows, cap))


@functools.partial(jax.jit, static_argnames=("kinds", "n", "width"), donate_argnames=("sstates",))
def prefix_scores_jit(kinds, states, sstates, ids, mask, tokens, lengths, start, *, n: int, width: int):
    """Each JAX prefix scorer on every row's response so far -> ([num_jax, rows], sstates).

    Value models keep their own KV cache (the prompt prefilled once per prompt), so a checkpoint
    feeds them only the `width` columns decoded since the previous one.
    """
    return block_scores(kinds, states, sstates, jnp.repeat(ids, n, 0), jnp.repeat(mask, n, 0), tokens,
                        lengths, start, width)


@functools.partial(jax.jit, static_argnames=("keep", "mesh", "data_axis"))
def compact_jit(ds: DecodeState, rules: DecodeRules, sstates, scores, *, keep: int, mesh=None,
                data_axis: str = "data"):
    """Keep each prompt's `keep` highest-scoring rows (in branch order) and drop the rest, in the
    decoding state, its rules and the prefix scorers' caches."""
    alive = scores.shape[1]
    _, idx = jax.lax.top_k(scores, keep)
    idx = jnp.sort(idx, axis=1)
    src = (jnp.arange(scores.shape[0]) * alive)[:, None] + idx
    src = src.reshape(-1)
    rows = lambda x: jnp.take(x, src, axis=0)  # noqa: E731
    ds = ds.replace(cache=ds.cache.take(src), pending=rows(ds.pending), positions=rows(ds.positions),
                    tokens=rows(ds.tokens), logprobs=rows(ds.logprobs), raw_logprobs=rows(ds.raw_logprobs),
                    lengths=rows(ds.lengths), finished=rows(ds.finished), aux=rows(ds.aux))
    rules = rules.replace(params=jax.tree.map(rows, rules.params), stop_ids=rows(rules.stop_ids),
                          max_new=rows(rules.max_new))
    sstates = tuple(None if ss is None else (ss[0].take(src), rows(ss[1])) for ss in sstates)
    return (constrain_rows(ds, mesh, data_axis), constrain_rows(rules, mesh, data_axis),
            constrain_rows(sstates, mesh, data_axis), idx)


def _weighted_total(sset, batch, ds, parts, alive: int, tokenizer) -> np.ndarray:
    """sum_i weight_i * score_i over the JAX parts [num_jax, rows] and the host scorers -> [rows]."""
    rows = ds.lengths.shape[0]
    real = batch.real_rows * alive
    total = np.zeros((rows,), np.float64)
    if sset.has_jax:
        parts = np.asarray(parts)
        if not np.all(np.isfinite(parts[:, :real])):
            bad = [sset.names[i] for i in range(parts.shape[0]) if not np.all(np.isfinite(parts[i, :real]))]
            raise ValueError(f"scorer(s) {bad} gave NaN/inf scores; fix the scorer so every score is finite.")
        total += np.asarray(sset.weights, np.float64) @ parts
    if sset.has_host:
        texts = decode_texts(tokenizer, ds.tokens[:real], ds.lengths[:real])
        prompts = [t for t in batch.prompt_texts[:batch.real_rows] for _ in range(alive)]
        total[:real] += host_weights(sset.host).astype(np.float64) @ host_scores(sset.host, prompts, texts)
    return total


def pruned_best_of_n(model, prompts, reward, prefix_scorer, *, n: int, schedule: PruneSchedule | str,
                     worst: bool = False, sampling: SamplingConfig | None = None,
                     frame: FrameConfig | None = None, **settings) -> PrunedBestOfNOutput:
    """Best-of-N (worst-of-N with worst=True) whose branches are pruned early by a prefix scorer.

    reward: the final scorer(s), as in `best_of_n`. prefix_scorer: what ranks partial responses at
    each checkpoint: a ValueModel (e.g. a CD-FUDGE scorer, on its own KV cache), a PrefixFn or a
    Python scorer run on the partial text, or a list of (scorer, weight) pairs. Worst-of-N keeps the
    lowest-scoring branches. An empty schedule is full best-of-N. sampling / frame, or their fields
    as keywords: see ``decoding.settings`` and ``engine.sample``.
    """
    sampling, frame = resolve_settings("pruned_best_of_n", sampling, frame, settings)
    tokenizer, mesh, data_axis, cap = frame.tokenizer, frame.mesh, frame.data_axis, frame.cap
    if int(n) < 1:
        raise ValueError(f"N must be at least 1, got {n}.")
    n = int(n)
    schedule = PruneSchedule.parse(schedule) if isinstance(schedule, str) else schedule
    longest = int(np.max(np.asarray(sampling.max_new_tokens)))
    schedule.check(n, longest)
    final = as_scorer_set(reward)
    prefix = as_scorer_set(prefix_scorer)
    if (final.has_host or prefix.has_host) and tokenizer is None:
        raise ValueError("a Python scorer scores text: pass tokenizer= so responses can be decoded.")
    batch = prepare_batch(model, prompts, sampling, frame)
    f = open_frame(model, batch, frame, n=n)
    graphdef, state, ds, rules = f.graphdef, f.state, f.ds, f.rules
    full_rows = ds.lengths.shape[0]
    ds = ds.replace(aux=jnp.arange(full_rows, dtype=jnp.int32))
    sstates = start_states_jit(prefix.kinds, prefix.states, batch.ids, batch.mask,
                               slots=batch.ids.shape[1] + batch.response_len, n=n)
    b, pb = batch.real_rows, batch.ids.shape[0]
    sign = -1.0 if worst else 1.0
    alive, decoded_rows = n, 0
    generated = np.zeros((b,), np.int64)
    prefix_log = []
    last = 0
    for cols, keep in zip(schedule.checkpoints, schedule.keep):
        before = int(ds.step)
        ds = branch_decode_jit(graphdef, state, ds, rules, cols, full_rows=full_rows, cap=cap)
        decoded_rows += (int(ds.step) - before) * pb * alive
        parts, sstates = prefix_scores_jit(prefix.kinds, prefix.states, sstates, batch.ids, batch.mask,
                                           ds.tokens, ds.lengths, last, n=alive, width=cols - last)
        scores = _weighted_total(prefix, batch, ds, parts, alive, tokenizer).reshape(pb, alive)
        prefix_log.append(jnp.asarray(scores[:b], jnp.float32))
        lengths = np.asarray(ds.lengths).reshape(pb, alive)
        ds, rules, sstates, idx = compact_jit(ds, rules, sstates, jnp.asarray(sign * scores, jnp.float32),
                                              keep=keep, mesh=mesh, data_axis=data_axis)
        kept = np.take_along_axis(lengths, np.asarray(idx), 1)
        generated += (lengths.sum(1) - kept.sum(1))[:b]  # tokens of the branches dropped here
        alive, last = keep, cols
    before = int(ds.step)
    ds = branch_decode_jit(graphdef, state, ds, rules, batch.response_len, full_rows=full_rows, cap=cap)
    decoded_rows += (int(ds.step) - before) * pb * alive
    parts = final_scores_jit(final.kinds, final.states, batch.ids, batch.mask, ds.tokens, ds.lengths, n=alive) \
        if final.has_jax else None
    totals = _weighted_total(final, batch, ds, parts, alive, tokenizer).reshape(pb, alive)[:b]
    chosen = select(jnp.asarray(totals, jnp.float32), worst)
    rows = b * alive
    lengths = trim(ds.lengths, rows).reshape(b, alive)
    generated += np.asarray(lengths).sum(1)
    out = PrunedBestOfNOutput(
        **trimmed_responses(ds, rows, batch.max_new_tokens, per_prompt=alive), scores=jnp.asarray(totals, jnp.float32),
        branch=trim(ds.aux, rows).reshape(b, alive) - (jnp.arange(b) * n)[:, None], chosen=chosen,
        prefix_scores=tuple(prefix_log), generated_tokens=generated, decoded_rows=decoded_rows)
    if tokenizer is not None:
        out = out.replace(texts=response_texts(tokenizer, out.tokens, out.lengths))
    return out
