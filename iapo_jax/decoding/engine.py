"""Compiled KV-cache sampling, `sample(model, prompts, ...)` and `generate(...)`, and the compiled
pieces every decoding mode (best_of_n, blockwise, token_cd, pruned_best_of_n) builds on.

Compiled pieces (one program per model, prompt bucket, response bucket, rows and branch count):
- `start_jit`: prefill each prompt once and broadcast it to n branches;
- `decode_jit`: the while-loop decode; its state is donated, so the cache is updated in place;
- `ref_logprobs_jit`: teacher-forced log-probs under a second model.
Sampling settings, stop sets, lengths and the key are traced arrays: changing them never recompiles.
Models cross `jax.jit` as (graphdef, state) and are merged inside.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx, struct

from iapo_jax.decoding.buckets import PROMPT_BUCKETS, RESPONSE_BUCKETS
from iapo_jax.decoding.filters import DEFAULT_CAP
from iapo_jax.decoding.inputs import Batch, prepare
from iapo_jax.decoding.loop import DecodeRules, decode, plain_choice, start
from iapo_jax.decoding.reference import response_logprobs
from iapo_jax.decoding.sharding import constrain_rows, place_params


@struct.dataclass
class SampleOutput:
    """Sampled responses; rows are prompt-major (prompt b, sample i -> row b*n + i)."""

    tokens: jax.Array  # [rows, max_new_tokens] int32; pad after each row's length
    lengths: jax.Array  # [rows] int32, the stop token included
    logprobs: jax.Array  # [rows, max_new_tokens] under the sampling policy (temperature + filters)
    raw_logprobs: jax.Array  # [rows, max_new_tokens] under the unfiltered temperature-1 policy
    ref_logprobs: jax.Array | None = None  # same tokens under the reference model, when asked
    texts: tuple[str, ...] | None = struct.field(pytree_node=False, default=None)


# ----------------------------------------------------------------------------------------------
# Compiled pieces
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "response_len", "n", "mesh", "data_axis"))
def start_jit(graphdef, state, ids, mask, rules: DecodeRules, *, response_len: int, n: int = 1,
              mesh=None, data_axis: str = "data"):
    """Prefill + broadcast to n branches -> (DecodeState, rules repeated to the branch rows)."""
    model = nnx.merge(graphdef, state)
    ds = start(model, ids, mask, response_len, rules.pad_id, n)
    if n > 1:
        rules = rules.repeat(n)
    return constrain_rows(ds, mesh, data_axis), constrain_rows(rules, mesh, data_axis)


@functools.partial(jax.jit, static_argnames=("graphdef", "cap"), donate_argnames=("dstate",))
def decode_jit(graphdef, state, dstate, rules: DecodeRules, until, *, cap: int = DEFAULT_CAP):
    """Decode columns dstate.step .. until-1 (early exit when all rows stop); dstate is donated."""
    model = nnx.merge(graphdef, state)
    return decode(model, dstate, rules, until, plain_choice(cap))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def ref_logprobs_jit(graphdef, state, ids, mask, tokens, lengths):
    model = nnx.merge(graphdef, state)  # each prompt runs once; its n responses share the cache
    return response_logprobs(model, ids, mask, tokens, lengths)


def split_model(model, mesh=None):
    """(graphdef, state) of an NNX model, the state placed on `mesh` by the logical rules."""
    graphdef, state = nnx.split(model)
    return graphdef, (place_params(state, mesh) if mesh is not None else state)


def decode_texts(tokenizer, tokens, lengths) -> tuple[str, ...]:
    toks, lens = np.asarray(tokens), np.asarray(lengths)
    return tuple(tokenizer.decode(t[:n].tolist(), skip_special_tokens=True) for t, n in zip(toks, lens))


def trim(x, rows: int, cols: int | None = None):
    """Drop mesh-padding rows and bucket-padding columns (no copy when there are none)."""
    if x is None:
        return None
    if x.shape[0] != rows:
        x = x[:rows]
    if cols is not None and x.ndim > 1 and x.shape[1] != cols:
        x = x[:, :cols]
    return x


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def sample_batch(model, batch: Batch, *, n: int = 1, ref_model=None, mesh=None, data_axis="data",
                 cap: int = DEFAULT_CAP, tokenizer=None, trim_output: bool = True,
                 clock=None) -> SampleOutput:
    """Sample n responses per prompt of a prepared batch (see `inputs.prepare`).

    clock: a runtime.stage_clock.StageClock that gets the "rollout" and "ref_logprobs" laps."""
    if int(n) < 1:
        raise ValueError(f"number of samples per prompt must be at least 1, got {n}.")
    graphdef, state = split_model(model, mesh)
    ds, rules = start_jit(graphdef, state, batch.ids, batch.mask, batch.rules,
                          response_len=batch.response_len, n=n, mesh=mesh, data_axis=data_axis)
    ds = decode_jit(graphdef, state, ds, rules, batch.response_len, cap=cap)
    rows = batch.real_rows * n
    cols = batch.max_new_tokens if trim_output else None
    if clock is not None:
        clock.lap("rollout", ds.tokens)
    ref_lp = None
    if ref_model is not None:  # the whole response bucket: a new max_new_tokens must not recompile
        rgraph, rstate = split_model(ref_model, mesh)
        ref_lp = ref_logprobs_jit(rgraph, rstate, batch.ids, batch.mask, ds.tokens, ds.lengths)
        if clock is not None:
            clock.lap("ref_logprobs", ref_lp)
    out = SampleOutput(tokens=trim(ds.tokens, rows, cols), lengths=trim(ds.lengths, rows),
                       logprobs=trim(ds.logprobs, rows, cols),
                       raw_logprobs=trim(ds.raw_logprobs, rows, cols),
                       ref_logprobs=trim(ref_lp, rows, cols))
    if tokenizer is not None:
        out = out.replace(texts=decode_texts(tokenizer, out.tokens, out.lengths))
        if clock is not None:
            clock.lap("detokenize")
    return out


def sample(
    model,
    prompts,
    *,
    max_new_tokens,
    n: int = 1,
    key: Any = 0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    greedy=False,
    stop_tokens=None,
    tokenizer=None,
    chat: bool = True,
    ref_model=None,
    mesh=None,
    data_axis: str = "data",
    prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
    response_buckets: Sequence[int] = RESPONSE_BUCKETS,
    cap: int = DEFAULT_CAP,
) -> SampleOutput:
    """Sample n responses per prompt.

    prompts: strings (with `tokenizer`; chat template applied when `chat`) or token-id lists.
    max_new_tokens, temperature, top_k, top_p, greedy: scalars or one value per prompt.
    stop_tokens: ids or token strings, shared or one set per prompt (default: the EOS ids).
    ref_model: also return the sampled tokens' log-probs under this model.
    mesh: split the batch over its `data_axis` (rows are padded to a multiple of its size).
    """
    batch = prepare(model, prompts, max_new_tokens=max_new_tokens, tokenizer=tokenizer, chat=chat,
                    stop_tokens=stop_tokens, key=key, temperature=temperature, top_k=top_k,
                    top_p=top_p, greedy=greedy, prompt_buckets=prompt_buckets,
                    response_buckets=response_buckets, mesh=mesh, data_axis=data_axis)
    return sample_batch(model, batch, n=n, ref_model=ref_model, mesh=mesh, data_axis=data_axis,
                        cap=cap, tokenizer=tokenizer)


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, **kwargs) -> SampleOutput:
    """Chat-template the prompts, sample, and decode the responses to `texts`."""
    return sample(model, prompts, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
