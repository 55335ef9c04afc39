"""A trained JAX reward model behind the reward protocol: ``score(prompts, responses)`` on strings.

Each (prompt, response) is tokenised the way the decoding engine lays a sampled response out:
the prompt through the chat template (ending with the assistant header), then the response text,
then the end-of-turn token (where a RewardModel with pooling 'last' reads its score; 'mean'
averages over every token). Sequences longer than
``max_length`` lose the start of the prompt, never the response or the end token. Rows are left
padded to a small set of widths and scored in fixed-size chunks, so one compiled program serves
every call of the same width.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from iapo_jax.data.tokenize import Prompt, chat_token_ids, left_pad, left_padded_mask
from iapo_jax.rewards.base import check_batch, check_scores
from iapo_jax.rewards.registry import register_reward
from iapo_jax.runtime.fixed_chunks import map_fixed_chunks

log = logging.getLogger(__name__)

WIDTHS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)


def end_token_id(tokenizer) -> int:
    """The token that closes an assistant turn (the tokenizer's EOS, e.g. SmolLM2's <|im_end|>)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; set one so "
                         "responses can be closed the way the chat template closes a turn")
    return eos


def sequence_ids(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], max_length: int,
                 system_prompt: str | None = None) -> tuple[list[list[int]], int]:
    """Token ids of chat(prompt) + response + end token, left-truncated to max_length.

    Returns (one id list per pair, number of pairs whose prompt start was cut).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens (got {max_length})")
    prompt_ids = chat_token_ids(tokenizer, list(prompts), system_prompt)
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    end = end_token_id(tokenizer)
    out, cut = [], 0
    for p, r in zip(prompt_ids, response_ids):
        r = list(r)[: max_length - 2] + [end]  # keep at least one prompt token
        seq = list(p) + r
        if len(seq) > max_length:
            seq, cut = seq[-max_length:], cut + 1
        out.append(seq)
    return out, cut


def width_for(lengths: Sequence[int], max_length: int, widths: Sequence[int] = WIDTHS) -> int:
    """Smallest width that holds the longest sequence (capped at max_length)."""
    longest = max(lengths) if len(lengths) else 1
    for w in widths:
        if longest <= w:
            return min(w, max_length)  # sequences never exceed max_length, so this still fits
    return max_length


def encode_pairs_text(tokenizer, prompts, responses, max_length: int, width: int | None = None,
                      system_prompt: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (ids [n, W] int32 left-padded, mask [n, W] bool, number of truncated rows)."""
    seqs, cut = sequence_ids(tokenizer, prompts, responses, max_length, system_prompt)
    lengths = [len(s) for s in seqs]
    if width is None:
        width = width_for(lengths, max_length)
    elif lengths and max(lengths) > width:
        raise ValueError(f"a sequence has {max(lengths)} tokens but width is {width}; raise width "
                         f"(at most max_length={max_length})")
    ids, lens = left_pad(seqs, width, 0)
    return ids, left_padded_mask(lens, width), cut


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_jit(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).score(ids, mask)


def score_arrays(model, ids: np.ndarray, mask: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Scores of token rows in fixed-size chunks (the last one padded), as float32 [n]."""
    graphdef, state = nnx.split(model)
    scores = map_fixed_chunks(functools.partial(_score_jit, graphdef, state), (ids, mask), batch_size)
    return np.zeros((0,), np.float32) if scores is None else np.asarray(scores)


class JaxRewardModel:
    """A RewardModel and its tokenizer as a ``Reward``: batched scores of (prompt, response) text.

    prompts may be strings (one user turn) or chat message lists; responses are strings.
    """

    def __init__(self, model, tokenizer, *, name: str = "reward_model", max_length: int = 512,
                 batch_size: int = 32, system_prompt: str | None = None):
        if not hasattr(model, "score") or not isinstance(model, nnx.Module):
            raise TypeError(f"JaxRewardModel needs a RewardModel (an NNX module with score(ids, mask)), "
                            f"got {type(model).__name__}")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
        end_token_id(tokenizer)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_length, self.batch_size, self.system_prompt = max_length, batch_size, system_prompt

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        n = _check_pairs(prompts, responses, self.name)
        if n == 0:
            return np.zeros((0,), np.float32)
        ids, mask, cut = encode_pairs_text(self.tokenizer, prompts, responses, self.max_length,
                                           system_prompt=self.system_prompt)
        if cut:
            log.warning("%s: cut the start of %d of %d prompts to fit max_length=%d", self.name, cut, n,
                        self.max_length)
        return check_scores(score_arrays(self.model, ids, mask, self.batch_size), n, self.name)


def _check_pairs(prompts, responses, name: str) -> int:
    if all(isinstance(p, str) for p in prompts):
        return check_batch(prompts, responses, name)
    # Chat message lists as prompts: check the responses and the lengths only.
    return check_batch([""] * len(prompts), responses, name)


@register_reward("reward_model")
def trained_reward_model(path: str | os.PathLike, step: int | None = None, **kwargs) -> JaxRewardModel:
    """``get_reward("reward_model", path=RUN_DIR)``: the reward model an ``iapo train-rm`` run saved."""
    from iapo_jax.rewards.head_checkpoints import load_head_model

    model, tokenizer, info = load_head_model(path, kind="reward", step=step)
    kwargs.setdefault("max_length", int(info.get("max_length", 512)))
    kwargs.setdefault("name", f"reward_model:{os.fspath(path)}")
    return JaxRewardModel(model, tokenizer, **kwargs)
