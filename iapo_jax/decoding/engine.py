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

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx, struct

from iapo_jax.decoding.filters import DEFAULT_CAP
from iapo_jax.decoding.inputs import Batch, prepare
from iapo_jax.decoding.loop import DecodeRules, decode, plain_choice, start
from iapo_jax.decoding.reference import response_logprobs
from iapo_jax.decoding.settings import FrameConfig, SamplingConfig, resolve_settings
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


def response_texts(tokenizer, tokens, lengths):
    """Decoded responses: a tuple of strings for [rows] lengths, a tuple per prompt for [prompts, n]."""
    lengths = np.asarray(lengths)
    if lengths.ndim == 1:
        return decode_texts(tokenizer, tokens, lengths)
    b, n = lengths.shape
    flat = decode_texts(tokenizer, np.asarray(tokens).reshape(b * n, -1), lengths.reshape(-1))
    return tuple(tuple(flat[i * n:(i + 1) * n]) for i in range(b))


def trim(x, rows: int, cols: int | None = None):
    """Drop mesh-padding rows and bucket-padding columns (no copy when there are none)."""
    if x is None:
        return None
    if x.shape[0] != rows:
        x = x[:rows]
    if cols is not None and x.ndim > 1 and x.shape[1] != cols:
        x = x[:, :cols]
    return x


def trimmed_responses(ds, rows: int, cols: int | None, per_prompt: int | None = None,
                      stride: int = 1) -> dict[str, Any]:
    """tokens, lengths, logprobs and raw_logprobs of a decode state's first ``rows`` rows (of every
    ``stride``-th row) and ``cols`` columns; with ``per_prompt``, shaped
    [rows / per_prompt, per_prompt, ...]."""
    every = (lambda x: x[::stride]) if stride > 1 else (lambda x: x)  # noqa: E731
    out = {"lengths": trim(every(ds.lengths), rows)}
    for name in ("tokens", "logprobs", "raw_logprobs"):
        out[name] = trim(every(getattr(ds, name)), rows, cols)
    if per_prompt is not None:
        out = {k: v.reshape(rows // per_prompt, per_prompt, *v.shape[1:]) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------------------------
# The decoding frame: prepare -> compiled start -> (the mode's decode) -> trim -> texts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Frame:
    """A prepared batch, the model split for jit (and placed on the mesh), and the prompts
    prefilled into n branches each: what every mode's decode starts from."""

    batch: Batch
    graphdef: Any
    state: Any
    ds: Any  # loop.DecodeState
    rules: DecodeRules
    config: FrameConfig


def prepare_batch(model, prompts, sampling: SamplingConfig, frame: FrameConfig) -> Batch:
    """``inputs.prepare`` with the two configs: validated, bucketed (and sharded) input arrays."""
    return prepare(model, prompts, max_new_tokens=sampling.max_new_tokens, tokenizer=frame.tokenizer,
                   chat=frame.chat, stop_tokens=sampling.stop_tokens, key=sampling.key,
                   temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   greedy=sampling.greedy, prompt_buckets=frame.prompt_buckets,
                   response_buckets=frame.response_buckets, mesh=frame.mesh, data_axis=frame.data_axis)


def open_frame(model, batch: Batch, frame: FrameConfig, *, n: int = 1, response_len: int | None = None) -> Frame:
    """Split the model and prefill ``batch`` into ``n`` branches per prompt, with room for
    ``response_len`` tokens (default: the batch's response bucket)."""
    graphdef, state = split_model(model, frame.mesh)
    ds, rules = start_jit(graphdef, state, batch.ids, batch.mask, batch.rules,
                          response_len=response_len or batch.response_len, n=n, mesh=frame.mesh,
                          data_axis=frame.data_axis)
    return Frame(batch, graphdef, state, ds, rules, frame)


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
    f = open_frame(model, batch, FrameConfig(mesh=mesh, data_axis=data_axis), n=n)
    ds = decode_jit(f.graphdef, f.state, f.ds, f.rules, batch.response_len, cap=cap)
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
    out = SampleOutput(**trimmed_responses(ds, rows, cols), ref_logprobs=trim(ref_lp, rows, cols))
    if tokenizer is not None:
        out = out.replace(texts=decode_texts(tokenizer, out.tokens, out.lengths))
        if clock is not None:
            clock.lap("detokenize")
    return out


def sample(model, prompts, *, n: int = 1, ref_model=None, sampling: SamplingConfig | None = None,
           frame: FrameConfig | None = None, **settings) -> SampleOutput:
    """Sample n responses per prompt.

    prompts: strings (with a tokenizer; chat template applied when `chat`) or token-id lists.
    sampling / frame, or their fields as keywords (see ``decoding.settings``): max_new_tokens,
    temperature, top_k, top_p, greedy are scalars or one value per prompt; stop_tokens ids or
    token strings, shared or one set per prompt (default: the EOS ids); mesh splits the batch over
    its `data_axis` (rows are padded to a multiple of its size).
    ref_model: also return the sampled tokens' log-probs under this model.
    """
    sampling, frame = resolve_settings("sample", sampling, frame, settings)
    batch = prepare_batch(model, prompts, sampling, frame)
    return sample_batch(model, batch, n=n, ref_model=ref_model, mesh=frame.mesh, data_axis=frame.data_axis,
                        cap=frame.cap, tokenizer=frame.tokenizer)


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, **kwargs) -> SampleOutput:
    """Chat-template the prompts, sample, and decode the responses to `texts`."""
    return sample(model, prompts, max_new_tokens=max_new_tokens, tokenizer=tokenizer, **kwargs)
