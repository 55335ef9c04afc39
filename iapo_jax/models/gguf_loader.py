"""Read a llama.cpp GGUF file into the HF tensor names and layouts that `hf_weights` understands.

Metadata become an HF-style config dict; each tensor is dequantised to float32 on its own
(`gguf.dequantize`) and renamed. llama.cpp stores the Llama Q and K projections permuted for its
interleaved ("GPT-J") rotary layout; that permutation is undone here so the weights fit the
`rotate_half` rotary embedding, as transformers' own GGUF loader does. Qwen2 GGUFs are not permuted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from iapo_jax.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Tensor types gguf.dequantize handles (F32/F16 directly, the rest through its quant classes).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFCheckpoint:
    """An opened GGUF file: `hf_config()`, `tensor_shapes()` and `stream_tensors()` in HF terms."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises plain ValueError/struct errors on bad files
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e}).") from None
        self.arch = self._field("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{self.path}: unsupported architecture {self.arch!r} in GGUF; "
                                  f"supported: {SUPPORTED_ARCHITECTURES}.")
        self._check_tensor_types()
        self.hf_names = {t.name: self._hf_name(t.name) for t in self.reader.tensors}

    # --- metadata -----------------------------------------------------------------------------

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def hf_config(self) -> dict:
        a = self.arch
        get = lambda key, default=None: self._field(f"{a}.{key}", default)  # noqa: E731
        required = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
        for key in required:
            if get(key) is None:
                raise CheckpointError(f"{self.path}: GGUF metadata {a}.{key} is missing.")
        if "rope_freqs.weight" in self.hf_names:
            raise CheckpointError(f"{self.path}: per-frequency rope factors (rope_freqs, Llama 3.1 "
                                  "style) are not supported in GGUF; load the HF checkpoint instead.")
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise CheckpointError(f"{self.path}: no token_embd.weight tensor; the GGUF is incomplete.")
        config = {
            "model_type": a,
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(get("attention.head_count_kv", heads)),
            "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
            "max_position_embeddings": int(get("context_length", 2048)),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            "vocab_size": int(embed.shape[-1]),  # rows of the embedding (ne[1])
            "tie_word_embeddings": "output.weight" not in self.hf_names,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }
        if a == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self.hf_names
        scaling = get("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise CheckpointError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported.")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        return config

    # --- tensors ------------------------------------------------------------------------------

    def tensor_shapes(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """HF name -> HF shape (GGUF lists dimensions fastest-first, so reverse them)."""
        shapes = {self.hf_names[t.name]: tuple(int(n) for n in reversed(t.shape))
                  for t in self.reader.tensors}
        return shapes, {name: f"{self.path} (tensor {name})" for name in shapes}

    def stream_tensors(self, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, np.ndarray]]:
        import gguf

        for t in self.reader.tensors:
            name = self.hf_names[t.name]
            shape = tuple(int(n) for n in reversed(t.shape))
            array = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            if self.arch == "llama" and ".q_proj." in name:
                array = _unpermute_rotary(array, num_heads)
            elif self.arch == "llama" and ".k_proj." in name:
                array = _unpermute_rotary(array, num_kv_heads)
            yield name, array

    def _check_tensor_types(self) -> None:
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which cannot "
                    f"be dequantised here; supported types: {', '.join(SUPPORTED_TYPES)}. "
                    "Re-quantise the model to one of them.")

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = _LAYER_PATTERN.fullmatch(name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        if name == "rope_freqs.weight":
            return name
        raise CheckpointError(f"{self.path}: unexpected GGUF tensor {name!r} for a {self.arch} model.")


def _unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head reordering of rotary features.

    llama.cpp interleaves each head's two rotary halves (feature pairs (i, i + d/2) become adjacent:
    rows reshaped [heads, 2, d/2] -> [heads, d/2, 2]); swapping back restores the `rotate_half` order.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
