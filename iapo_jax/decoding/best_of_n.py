"""Best-of-N and worst-of-N: prefill each prompt once, broadcast its cache to N branches, sample all
N in one compiled call, score them, and keep the best (or worst) per prompt.

Soft best-of-N (``lam=``): serve response i with probability softmax(score / lam)_i, drawn as
argmax(score + lam * Gumbel) so no exponential overflows; lam is a traced value (no recompiles).
Pass a calibrated reward as the scorer to select on C as the analytic tool does.

With only JAX scorers (reward models, value models, PrefixFn) decoding, scoring and selection are
one compiled program. Python scorers on strings run on the host after the compiled decode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from iapo_jax.decoding.engine import (
    decode_jit,
    decode_texts,
    open_frame,
    prepare_batch,
    response_texts,
    trimmed_responses,
)
from iapo_jax.decoding.filters import DEFAULT_CAP
from iapo_jax.decoding.inputs import as_key
from iapo_jax.decoding.kl_bounds import best_of_k_kl_bound
from iapo_jax.decoding.loop import DecodeRules, decode, plain_choice
from iapo_jax.decoding.settings import FrameConfig, SamplingConfig, resolve_settings
from iapo_jax.decoding.scorers import as_scorer_set, final_scores, host_scores, host_weights


class ServedResponse:
    """The served response of outputs holding tokens [B, M, T], lengths [B, M], texts [B][M] and
    the index chosen [B] among the M."""

    @property
    def best_tokens(self) -> jax.Array:
        return jnp.take_along_axis(self.tokens, self.chosen[:, None, None], 1)[:, 0]

    @property
    def best_lengths(self) -> jax.Array:
        return jnp.take_along_axis(self.lengths, self.chosen[:, None], 1)[:, 0]

    @property
    def best_texts(self) -> tuple[str, ...] | None:
        if self.texts is None:
            return None
        return tuple(row[int(c)] for row, c in zip(self.texts, np.asarray(self.chosen)))


@struct.dataclass
class BestOfNOutput(ServedResponse):
    """All N responses per prompt with their scores, and the chosen one."""

    tokens: jax.Array  # [B, N, T] int32
    lengths: jax.Array  # [B, N]
    logprobs: jax.Array  # [B, N, T] under the sampling policy
    raw_logprobs: jax.Array  # [B, N, T] under the unfiltered temperature-1 policy
    scores: jax.Array  # [B, N] weighted sum of the scorers
    component_scores: jax.Array  # [num_scorers, B, N] each scorer alone (JAX scorers first)
    chosen: jax.Array  # [B] index of the selected response
    kl_bound: float = struct.field(pytree_node=False, default=0.0)  # log N - (N-1)/N
    texts: tuple | None = struct.field(pytree_node=False, default=None)  # [B][N] strings


def select(scores: jax.Array, worst: bool) -> jax.Array:
    """[B, N] -> [B] index of the best (highest) or worst (lowest) score; ties go to the first."""
    return jnp.argmin(scores, axis=1) if worst else jnp.argmax(scores, axis=1)


def soft_select(scores: jax.Array, lam, key) -> jax.Array:
    """[B, N] -> [B]: index i with probability softmax(scores / lam)_i (Gumbel-max trick)."""
    return jnp.argmax(scores + lam * jax.random.gumbel(key, scores.shape, jnp.float32), axis=1)


soft_select_jit = jax.jit(soft_select)


@functools.partial(jax.jit, static_argnames=("graphdef", "kinds", "n", "worst", "cap", "soft"),
                   donate_argnames=("dstate",))
def best_of_n_jit(graphdef, state, dstate, rules: DecodeRules, ids, mask, kinds, sstates, weights,
                  until, lam=None, select_key=None, *, n: int, worst: bool, cap: int = DEFAULT_CAP,
                  soft: bool = False):
    """Decode the N branches, score them with the JAX scorers and select, in one program."""
    model = nnx.merge(graphdef, state)
    ds = decode(model, dstate, rules, until, plain_choice(cap))
    parts = final_scores(kinds, sstates, jnp.repeat(ids, n, 0), jnp.repeat(mask, n, 0),
                         ds.tokens, ds.lengths)
    total = (weights @ parts).reshape(-1, n)
    return ds, parts, soft_select(total, lam, select_key) if soft else select(total, worst)


def check_lam(lam, worst: bool) -> float:
    """Soft best-of-N's temperature as a float; raises ValueError naming the problem and the fix."""
    if worst:
        raise ValueError("lam (soft selection) applies to best-of-N only; leave it unset with worst=True")
    number = isinstance(lam, (int, float, np.floating)) and not isinstance(lam, bool)
    if not number or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"soft best-of-N needs a finite selection temperature lam > 0, got {lam!r}; "
                         "leave lam unset for hard best-of-N")
    return float(lam)


@functools.partial(jax.jit, static_argnames=("kinds", "n"))
def final_scores_jit(kinds, sstates, ids, mask, tokens, lengths, *, n: int):
    return final_scores(kinds, sstates, jnp.repeat(ids, n, 0), jnp.repeat(mask, n, 0), tokens, lengths)


def best_of_n(model, prompts, reward, *, n: int, worst: bool = False, weights=None, lam: float | None = None,
              sampling: SamplingConfig | None = None, frame: FrameConfig | None = None,
              **settings) -> BestOfNOutput:
    """Sample n responses per prompt and select the best (or, with worst=True, the worst); with
    lam, soft best-of-N: response i with probability softmax(score / lam)_i.

    reward: a scorer or a list of scorers / (scorer, weight) pairs (see `scorers`); `weights`
    overrides the weights at call time. Python scorers get (prompt texts, response texts) and must
    return one finite score per response. sampling / frame, or their fields as keywords: see
    ``decoding.settings`` and ``engine.sample``.
    """
    sampling, frame = resolve_settings("best_of_n", sampling, frame, settings)
    tokenizer, key = frame.tokenizer, sampling.key
    if int(n) < 1:
        raise ValueError(f"N must be at least 1, got {n}.")
    n = int(n)
    soft = lam is not None
    lam = check_lam(lam, worst) if soft else None
    # the selection's own stream: the responses stay those of hard best-of-N with the same key
    select_key = jax.random.fold_in(as_key(key), 0x50F7) if soft else None
    sset = as_scorer_set(reward, weights)
    if sset.has_host and tokenizer is None:
        raise ValueError("a Python scorer scores text: pass tokenizer= so responses can be decoded.")
    batch = prepare_batch(model, prompts, sampling, frame)
    f = open_frame(model, batch, frame, n=n)
    graphdef, state, ds, rules, cap = f.graphdef, f.state, f.ds, f.rules, frame.cap
    rows = batch.real_rows * n
    b = batch.real_rows
    if not sset.has_host:
        ds, parts, chosen = best_of_n_jit(graphdef, state, ds, rules, batch.ids, batch.mask, sset.kinds,
                                          sset.states, sset.weights, batch.response_len,
                                          jnp.float32(lam) if soft else None, select_key, n=n,
                                          worst=worst, cap=cap, soft=soft)
        parts = parts[:, :rows]
        chosen = chosen[:b]
    else:
        ds = decode_jit(graphdef, state, ds, rules, batch.response_len, cap=cap)
        parts_np = []
        weight_np = []
        if sset.has_jax:
            jp = final_scores_jit(sset.kinds, sset.states, batch.ids, batch.mask, ds.tokens, ds.lengths, n=n)
            parts_np.append(np.asarray(jp)[:, :rows])
            weight_np.append(np.asarray(sset.weights))
        texts = decode_texts(tokenizer, ds.tokens[:rows], ds.lengths[:rows])
        prompt_texts = [t for t in batch.prompt_texts[:b] for _ in range(n)]
        parts_np.append(host_scores(sset.host, prompt_texts, texts))
        weight_np.append(host_weights(sset.host))
        parts = jnp.asarray(np.concatenate(parts_np))
        total = jnp.asarray(np.concatenate(weight_np)) @ parts
        chosen = (soft_select_jit(total.reshape(b, n), jnp.float32(lam), select_key) if soft
                  else select(total.reshape(b, n), worst))
    parts_host = np.asarray(parts)
    if not np.all(np.isfinite(parts_host)):
        bad = [sset.names[i] for i in range(parts_host.shape[0]) if not np.all(np.isfinite(parts_host[i]))]
        raise ValueError(f"scorer(s) {bad} gave NaN/inf scores; fix the scorer so every score is finite.")
    all_w = np.concatenate([np.asarray(sset.weights), host_weights(sset.host)]) if sset.has_host \
        else np.asarray(sset.weights)
    total = jnp.asarray(all_w) @ parts
    out = BestOfNOutput(
        **trimmed_responses(ds, rows, batch.max_new_tokens, per_prompt=n),
        scores=total.reshape(b, n), component_scores=parts.reshape(-1, b, n), chosen=chosen,
        # soft: the served pmf is at most N times pi's (one of N draws), so KL <= log N
        kl_bound=math.log(n) if soft else best_of_k_kl_bound(n))
    if tokenizer is not None:
        out = out.replace(texts=response_texts(tokenizer, out.tokens, out.lengths))
    return out
