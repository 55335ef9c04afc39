"""Chat-template tokenisation of prompts into left-padded id arrays for the sampler.

Left padding puts every prompt's last token in the last column, so decoding starts at the same
position for the whole batch. The padding id is arbitrary: validity comes from ``lengths`` only
(``left_padded_mask``). Never derive a mask from ``ids == pad_id``: SmolLM2's pad token
``<|im_end|>`` also ends every turn inside its chat template.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]  # a user message, or a whole chat (role/content dicts)


def chat_messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt as chat messages: a string becomes one user turn; message lists are checked."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = []
        for i, message in enumerate(prompt):
            if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
                raise ValueError(
                    f"chat message {i} must be a dict with 'role' and 'content', got {message!r}"
                )
            messages.append({"role": str(message["role"]), "content": str(message["content"])})
        if not messages:
            raise ValueError("a chat prompt needs at least one message, got an empty list")
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def chat_token_ids(tokenizer, prompts: Sequence[Prompt], system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt rendered by the tokenizer's chat template, ending with the
    assistant header (add_generation_prompt). Special tokens come from the template only."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; load an instruct/chat "
            "tokenizer or set tokenizer.chat_template to a Jinja template (e.g. ChatML)"
        )
    texts = [
        tokenizer.apply_chat_template(
            chat_messages(p, system_prompt), add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def left_pad(token_lists: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Packs token lists into (ids [B, width] int32 left-padded with pad_id, lengths [B] int32)."""
    ids = np.full((len(token_lists), width), pad_id, np.int32)
    lengths = np.zeros((len(token_lists),), np.int32)
    for row, tokens in enumerate(token_lists):
        if len(tokens) > width:
            raise ValueError(f"row {row} has {len(tokens)} tokens, more than width {width}")
        if tokens:
            ids[row, width - len(tokens):] = tokens
        lengths[row] = len(tokens)
    return ids, lengths


def left_padded_mask(lengths, width: int) -> np.ndarray:
    """bool [B, width]: True on the last ``lengths[b]`` columns of row b (the real tokens)."""
    lengths = np.asarray(lengths)
    return np.arange(width)[None, :] >= (width - lengths)[:, None]


def filter_prompts_by_length(
    tokenizer, prompts: Sequence[Prompt], max_prompt_len: int, system_prompt: str | None = None
) -> tuple[list[Prompt], list[int]]:
    """Keeps the prompts whose chat-template encoding fits in max_prompt_len tokens.

    Returns (kept prompts, their indices in ``prompts``), so texts stay aligned with their ids.
    """
    _check_max_len(max_prompt_len)
    token_lists = chat_token_ids(tokenizer, prompts, system_prompt)
    kept = [i for i, tokens in enumerate(token_lists) if len(tokens) <= max_prompt_len]
    return [prompts[i] for i in kept], kept


def encode_chat_prompts(
    tokenizer,
    prompts: Sequence[Prompt],
    max_prompt_len: int,
    *,
    too_long: str = "error",
    pad_to_longest: bool = False,
    system_prompt: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chat-template encodes prompts -> (ids [B, T] int32 left-padded, lengths [B] int32).

    T is ``max_prompt_len`` (one fixed shape, so one compilation), or the longest prompt with
    ``pad_to_longest``. Prompts longer than max_prompt_len tokens raise (``too_long='error'``,
    naming the first one) or are dropped with a log line (``too_long='drop'``; use
    ``filter_prompts_by_length`` first when you need to know which ones survive).
    """
    _check_max_len(max_prompt_len)
    if too_long not in ("error", "drop"):
        raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, got a single string; wrap it in a list")
    if len(prompts) == 0:
        raise ValueError("no prompts to encode; pass at least one prompt")
    token_lists = chat_token_ids(tokenizer, prompts, system_prompt)
    over = [i for i, tokens in enumerate(token_lists) if len(tokens) > max_prompt_len]
    if over and too_long == "error":
        first = over[0]
        raise ValueError(
            f"{len(over)} of {len(prompts)} prompts exceed max_prompt_len={max_prompt_len} tokens "
            f"(first: prompt {first}, {len(token_lists[first])} tokens, {str(prompts[first])[:60]!r}); "
            "raise max_prompt_len or pass too_long='drop'"
        )
    if over:
        log.info("dropped %d of %d prompts longer than %d tokens", len(over), len(prompts), max_prompt_len)
        token_lists = [t for t in token_lists if len(t) <= max_prompt_len]
        if not token_lists:
            raise ValueError(
                f"all {len(prompts)} prompts exceed max_prompt_len={max_prompt_len} tokens; raise it"
            )
    width = max(len(t) for t in token_lists) if pad_to_longest else max_prompt_len
    return left_pad(token_lists, width, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def _check_max_len(max_prompt_len) -> None:
    if isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be a positive integer, got {max_prompt_len!r}")
