"""Chat-template tokenisation: ids must equal transformers' own apply_chat_template(tokenize=True)."""

from pathlib import Path

import numpy as np
import pytest

from iapo_jax.data.tokenize import (
    chat_messages,
    encode_chat_prompts,
    filter_prompts_by_length,
    left_padded_mask,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """A tiny word-level tokenizer whose pad token <|im_end|> also ends every template turn."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "hello world what is the capital of france ? tell me a long story about user assistant system".split()
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, " ": 3, "\n": 4}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\?"), behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<|im_end|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def _reference_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_left_padded_ids_match_transformers(chatml_tokenizer):
    tok = chatml_tokenizer
    prompts = ["hello", "what is the capital of france?", [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "tell me a story"},
    ]]
    ids, lengths = encode_chat_prompts(tok, prompts, max_prompt_len=48)
    assert ids.shape == (3, 48) and ids.dtype == np.int32 and lengths.dtype == np.int32
    mask = left_padded_mask(lengths, 48)
    for row, prompt in enumerate(prompts):
        want = _reference_ids(tok, chat_messages(prompt))
        assert lengths[row] == len(want)
        assert ids[row][mask[row]].tolist() == want
        assert np.all(ids[row][~mask[row]] == tok.pad_token_id)
    # The pad id occurs inside real prompts, so a mask from `ids != pad_id` would be wrong.
    assert np.any(ids[mask] == tok.pad_token_id)
    assert not np.array_equal(ids != tok.pad_token_id, mask)


def test_pad_to_longest_and_system_prompt(chatml_tokenizer):
    ids, lengths = encode_chat_prompts(chatml_tokenizer, ["hello", "hello world"], 64, pad_to_longest=True)
    assert ids.shape[1] == lengths.max()
    with_system, sys_len = encode_chat_prompts(chatml_tokenizer, ["hello"], 64, system_prompt="a story")
    assert sys_len[0] > lengths[0]
    assert with_system[0, 64 - sys_len[0]:].tolist()[:3] == chatml_tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "system", "\n"]
    )


def test_length_filter_errors_or_drops(chatml_tokenizer):
    tok = chatml_tokenizer
    long = "tell me a long story about " * 10
    prompts = ["hello", long, "hello world"]
    with pytest.raises(ValueError, match=r"1 of 3 prompts exceed max_prompt_len=20 tokens \(first: prompt 1"):
        encode_chat_prompts(tok, prompts, 20)
    ids, lengths = encode_chat_prompts(tok, prompts, 20, too_long="drop")
    assert ids.shape == (2, 20)
    kept, index = filter_prompts_by_length(tok, prompts, 20)
    assert kept == ["hello", "hello world"] and index == [0, 2]
    with pytest.raises(ValueError, match="all 1 prompts exceed"):
        encode_chat_prompts(tok, [long], 20, too_long="drop")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_prompt_len": 0}, "positive integer"),
        ({"max_prompt_len": 8, "too_long": "truncate"}, "'error' or 'drop'"),
        ({"max_prompt_len": 8, "prompts": []}, "no prompts"),
        ({"max_prompt_len": 8, "prompts": [[{"role": "user"}]]}, "'role' and 'content'"),
    ],
)
def test_bad_input(chatml_tokenizer, kwargs, message):
    kwargs = {"prompts": ["hello"], **kwargs}
    with pytest.raises(ValueError, match=message):
        encode_chat_prompts(chatml_tokenizer, **kwargs)


def test_tokenizer_without_template(chatml_tokenizer):
    import copy

    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        encode_chat_prompts(tok, ["hello"], 8)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_gguf):
    # The packaged SmolLM2 GGUF tokenizer (about 15 s to rebuild): its pad <|im_end|> ends each turn.
    from transformers import AutoTokenizer

    path = Path(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompts = ["What is the capital of France?", "Tell me a joke"]
    ids, lengths = encode_chat_prompts(tok, prompts, max_prompt_len=64)
    mask = left_padded_mask(lengths, 64)
    for row, prompt in enumerate(prompts):
        assert ids[row][mask[row]].tolist() == _reference_ids(tok, chat_messages(prompt))
    assert tok.pad_token == "<|im_end|>" and np.sum(ids[0][mask[0]] == tok.pad_token_id) >= 2
