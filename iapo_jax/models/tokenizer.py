"""Tokenizers through `transformers.AutoTokenizer`, from an HF directory or the tokenizer in a GGUF.

The chat template comes along (GGUF files carry theirs in `tokenizer.chat_template`). A tokenizer
that could emit ids beyond the model's embedding table is rejected. A tokenizer without a pad token
gets its EOS token as pad; masks must still come from lengths, never from `token == pad_id`.
"""

from __future__ import annotations

import os

import iapo_jax.models.safetensors_reader as safetensors_reader
from iapo_jax.errors import CheckpointError
from iapo_jax.models.checkpoints import DEFAULT_MODEL, resolve_source


def load_tokenizer(source: str | os.PathLike | None = DEFAULT_MODEL, model=None):
    """A transformers tokenizer for `source`, checked against the model's vocabulary.

    The vocabulary is compared with `model.config.vocab_size` when a model is given, else with the
    directory's config.json (a GGUF's tokenizer and embedding come from the same file).
    """
    from transformers import AutoTokenizer

    kind, path = resolve_source(source)
    try:
        if kind == "hf":
            tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer ({e}); save one next to the weights "
                              "with tokenizer.save_pretrained or save_hf(..., tokenizer=...).") from None
    if model is not None:
        vocab_size, where = _config_of(model).vocab_size, "the given model"
    elif kind == "hf":
        vocab_size = safetensors_reader.read_config(path).get("vocab_size")
        where = str(path / "config.json")
    else:
        vocab_size, where = None, str(path)
    if vocab_size is not None:
        check_tokenizer_fits(tokenizer, int(vocab_size), where, str(path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_fits(tokenizer, vocab_size: int, model_source: str, tokenizer_source: str) -> None:
    """Raise CheckpointError if the tokenizer has ids >= vocab_size (they would index past the table)."""
    size = len(tokenizer)
    if size > vocab_size:
        raise CheckpointError(
            f"{tokenizer_source}: tokenizer vocabulary has {size} tokens but the model ({model_source}) "
            f"has vocab_size {vocab_size}; use the tokenizer that belongs to this model.")


def _config_of(model):
    config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
    if config is None:
        raise TypeError(f"load_tokenizer(model=...) needs a Transformer or a head model, got "
                        f"{type(model).__name__}.")
    return config
