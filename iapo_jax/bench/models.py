"""Benchmark models with random weights, made on the spot from named architectures: no download,
so any machine with the repository and transformers can run the whole benchmark (a GPU box cannot
receive SmolLM2's file, and needs none).

The shapes follow the published configs: SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct),
Llama 3.2 1B and Llama 3.1 8B (meta-llama); Llama 3's long-context RoPE scaling is left out (it
does not change the cost of a step). Weights are written by transformers, so this project and the
PyTorch baseline read the very same file.
"""

from __future__ import annotations

from pathlib import Path

TINY = "tiny"

# name -> LlamaConfig fields
RANDOM_MODELS = {
    TINY: dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
    "smollm2-135m-random": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                                tie_word_embeddings=True),
    "llama-1b-random": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                            tie_word_embeddings=True),
    "llama-8b-random": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                            tie_word_embeddings=False),
}


def is_random_model(source: str) -> bool:
    return source in RANDOM_MODELS


def random_config(name: str):
    """The transformers LlamaConfig of a named random model."""
    from transformers import LlamaConfig

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose from {sorted(RANDOM_MODELS)}")
    return LlamaConfig(**RANDOM_MODELS[name], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def param_count(name: str) -> int:
    """Parameters of a named model, from its shapes alone (nothing is allocated)."""
    c = RANDOM_MODELS[name]
    d, f, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head = d // c["num_attention_heads"]
    attention = d * d * 2 + 2 * d * c["num_key_value_heads"] * head  # q, o; k, v
    per_layer = attention + 3 * d * f + 2 * d  # gate, up, down; two norms
    return layers * per_layer + v * d * (1 if c["tie_word_embeddings"] else 2) + d


def make_random_checkpoint(name: str, directory: Path, dtype: str = "float32") -> Path:
    """Write a named model with transformers' random initialisation (seed 0) in HF format."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = random_config(name)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    # Built in the target dtype: an 8B model in float32 would need 32 GB just to be written.
    torch.set_default_dtype({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(directory)
    del model
    return directory
