"""Turn user input (prompts, lengths, stop tokens, sampling settings, seed) into validated, bucketed,
left-padded device arrays, rejecting bad input before any compute starts."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iapo_jax.decoding.buckets import PROMPT_BUCKETS, RESPONSE_BUCKETS, bucket_for
from iapo_jax.decoding.filters import sampling_params
from iapo_jax.decoding.loop import DecodeRules
from iapo_jax.decoding.sharding import pad_rows_for, put_rows


@dataclasses.dataclass(frozen=True)
class Batch:
    """A decoding batch ready for the compiled functions."""

    ids: jax.Array  # [rows, P] int32, left-padded
    mask: jax.Array  # [rows, P] bool
    rules: DecodeRules
    response_len: int  # response bucket R
    max_new_tokens: int  # the longest requested response (<= R)
    real_rows: int  # rows before padding for the mesh
    prompt_texts: tuple[str, ...] | None  # for rewards and scorers on strings


def as_key(seed_or_key) -> jax.Array:
    """An int seed or a PRNG key -> a typed key (so both spellings share one compiled program)."""
    if isinstance(seed_or_key, (int, np.integer)):
        return jax.random.key(int(seed_or_key))
    key = jnp.asarray(seed_or_key) if not isinstance(seed_or_key, jax.Array) else seed_or_key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key must be an int seed or a PRNG key, got {type(seed_or_key).__name__} "
                     f"{getattr(key, 'shape', '')}. Pass e.g. 0 or jax.random.key(0).")


def tokenize_prompts(prompts, tokenizer, chat: bool) -> tuple[list[list[int]], tuple[str, ...] | None]:
    """Strings go through the chat template (or plain encoding); token id lists pass through."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings or of token-id lists, got a single string; "
                        "wrap it in a list.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt.")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are strings but no tokenizer was given; pass tokenizer= "
                             "or token-id lists.")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
        if chat and getattr(tokenizer, "chat_template", None):
            ids = [list(_as_ids(tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)))
                for p in prompts]
        else:
            ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
        return ids, tuple(prompts)
    if any(isinstance(p, str) for p in prompts):
        raise TypeError("prompts mix strings and token ids; pass one kind.")
    ids = [[int(t) for t in np.asarray(p).reshape(-1)] for p in prompts]
    texts = None
    if tokenizer is not None:
        texts = tuple(tokenizer.decode(p, skip_special_tokens=False) for p in ids)
    return ids, texts


def _as_ids(out) -> list[int]:
    # transformers 5 may return a BatchEncoding from apply_chat_template.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return [int(t) for t in out]


def stop_token_ids(stop_tokens, config, tokenizer, rows: int) -> np.ndarray:
    """Per-row stop sets -> [rows, S] int32 padded with -1. Default: the model's EOS ids."""
    vocab = config.vocab_size
    if stop_tokens is None:
        default = set(config.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            default.add(int(tokenizer.eos_token_id))
        per_row = [sorted(default)] * rows
    elif isinstance(stop_tokens, (str, int, np.integer)):
        per_row = [[stop_tokens]] * rows
    else:
        stop_tokens = list(stop_tokens)
        nested = stop_tokens and all(isinstance(s, (list, tuple)) for s in stop_tokens)
        if nested and len(stop_tokens) != rows:
            raise ValueError(f"per-row stop_tokens has {len(stop_tokens)} sets for {rows} prompts; "
                             "give one set per prompt or one shared set.")
        per_row = stop_tokens if nested else [stop_tokens] * rows
    resolved = [[_stop_id(s, vocab, tokenizer) for s in row] for row in per_row]
    # Stop sets are padded to a multiple of 4 so that small sets share one compiled shape.
    width = 4 * max(1, -(-max(len(r) for r in resolved) // 4))
    out = np.full((rows, width), -1, np.int32)
    for i, r in enumerate(resolved):
        out[i, : len(r)] = r
    return out


def _stop_id(token, vocab: int, tokenizer) -> int:
    if isinstance(token, str):
        if tokenizer is None:
            raise ValueError(f"stop token {token!r} is a string but no tokenizer was given; "
                             "pass its id or a tokenizer.")
        tid = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token", None)
        if tid is None or (isinstance(tid, int) and tid == tokenizer.unk_token_id and token != unk):
            raise ValueError(f"unknown stop token {token!r}: it is not a single token of this "
                             "tokenizer's vocabulary. Pass a token string from the vocabulary or an id.")
        return int(tid)
    tid = int(token)
    if not 0 <= tid < vocab:
        raise ValueError(f"unknown stop token id {tid}: the model's vocabulary has ids 0..{vocab - 1}.")
    return tid


def _per_row_lengths(max_new_tokens, rows: int) -> np.ndarray:
    arr = np.asarray(max_new_tokens)
    arr = np.full((rows,), arr) if arr.ndim == 0 else arr
    if arr.shape != (rows,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"max_new_tokens must be an int or one int per prompt ({rows}), got "
                         f"{max_new_tokens!r}.")
    if np.any(arr < 1):
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}.")
    return arr.astype(np.int32)


def prepare(
    model,
    prompts,
    *,
    max_new_tokens,
    tokenizer=None,
    chat: bool = True,
    stop_tokens=None,
    key: Any = 0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    greedy=False,
    prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
    response_buckets: Sequence[int] = RESPONSE_BUCKETS,
    mesh=None,
    data_axis: str = "data",
) -> Batch:
    """Validate everything on the host, then build the padded, bucketed (and sharded) arrays."""
    config = model.config
    ids, texts = tokenize_prompts(prompts, tokenizer, chat)
    rows = len(ids)
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary "
                             f"(0..{config.vocab_size - 1}); was it tokenised for another model?")
    longest = max(len(p) for p in ids)
    p_len = bucket_for(longest, prompt_buckets, "prompt")
    max_new = _per_row_lengths(max_new_tokens, rows)
    r_len = bucket_for(int(max_new.max()), response_buckets, "response")
    if config.family == "gpt2" and longest + int(max_new.max()) > config.max_position_embeddings:
        raise ValueError(f"a {longest}-token prompt plus {int(max_new.max())} new tokens exceeds the "
                         f"{config.max_position_embeddings} learned positions of this model; shorten one.")
    params = sampling_params(rows, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    stops = stop_token_ids(stop_tokens, config, tokenizer, rows)
    key = as_key(key)

    # Pad the batch to a multiple of the mesh's data axis with copies of row 0 that stop at once.
    total = pad_rows_for(rows, mesh, data_axis)
    extra = total - rows
    id_arr = np.zeros((total, p_len), np.int32)
    mask = np.zeros((total, p_len), bool)
    for i in range(total):
        p = ids[i] if i < rows else ids[0]
        id_arr[i, p_len - len(p):] = p
        mask[i, p_len - len(p):] = True
    pad_id = config.pad_token_id if config.pad_token_id is not None else (
        config.eos_token_ids[0] if config.eos_token_ids else 0)
    grow = lambda x: jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)]) if extra else x  # noqa: E731
    params = jax.tree.map(grow, params)
    max_new = np.concatenate([max_new, np.ones((extra,), np.int32)])
    stops = np.concatenate([stops, np.repeat(stops[:1], extra, axis=0)])
    rules = DecodeRules(params=params, stop_ids=jnp.asarray(stops), max_new=jnp.asarray(max_new),
                        key=key, pad_id=jnp.asarray(pad_id, jnp.int32))
    id_arr, mask = jnp.asarray(id_arr), jnp.asarray(mask)
    if mesh is not None:
        id_arr, mask = put_rows(id_arr, mesh, data_axis), put_rows(mask, mesh, data_axis)
        rules = rules.replace(params=put_rows(rules.params, mesh, data_axis),
                              stop_ids=put_rows(rules.stop_ids, mesh, data_axis),
                              max_new=put_rows(rules.max_new, mesh, data_axis))
    return Batch(ids=id_arr, mask=mask, rules=rules, response_len=r_len,
                 max_new_tokens=int(max_new[:rows].max()), real_rows=rows, prompt_texts=texts)
