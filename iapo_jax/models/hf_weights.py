"""How each Hugging Face tensor maps onto the transformer's stacked parameters, both directions.

A `TensorRule` ties one HF tensor (name, shape, HF layout) to one or more internal parameters
(path, layer index, internal layout). Loaders check names and shapes against the rules before reading
any data, then stream tensors through `rule.load`; `save_hf` walks the same rules with `rule.save`.

Layouts: HF Linear weights are (out, in); GPT-2 Conv1D weights are (in, out) with q, k, v fused in
one c_attn tensor. Internally projections are (in, heads, head_dim) / (heads, head_dim, out) so each
axis can carry its own logical name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from iapo_jax.models.config import ModelConfig

Target = tuple[str, int | None]  # (parameter path such as 'layers.q' or 'embed', layer or None)

# Buffers some checkpoints carry that are not parameters.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_name: str
    hf_shape: tuple[int, ...]
    targets: tuple[Target, ...]
    load: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF array -> one array per target
    save: Callable[..., np.ndarray]  # internal arrays (one per target) -> HF array


def tensor_rules(config: ModelConfig) -> dict[str, TensorRule]:
    """Every tensor a checkpoint of this config holds, keyed by HF name."""
    rules = _gpt2_rules(config) if config.family == "gpt2" else _llama_rules(config)
    return {r.hf_name: r for r in rules}


def is_ignored(config: ModelConfig, name: str) -> bool:
    """Non-parameter buffers, and a stored copy of a tied head."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"


def normalise_name(config: ModelConfig, name: str) -> str:
    """GPT-2 checkpoints of the bare GPT2Model omit the 'transformer.' prefix."""
    if config.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


# --- layout conversions -----------------------------------------------------------------------


def _same(a):
    return (a,)


def _identity(a):
    return a


def _linear_in(heads: int | None, head_dim: int | None):
    """HF (out, in) [+ heads split] -> internal (in, heads, head_dim) or (in, out)."""
    def load(w):
        w = w.T
        return (w.reshape(w.shape[0], heads, head_dim) if heads else w,)

    def save(w):
        return w.reshape(w.shape[0], -1).T
    return load, save


def _linear_out(heads: int | None, head_dim: int | None):
    """HF (out, in=heads*head_dim) -> internal (heads, head_dim, out)."""
    def load(w):
        return (w.T.reshape(heads, head_dim, w.shape[0]),)

    def save(w):
        return w.reshape(-1, w.shape[-1]).T
    return load, save


def _bias_heads(heads: int, head_dim: int):
    return (lambda b: (b.reshape(heads, head_dim),)), (lambda b: b.reshape(-1))


def _rule(name, shape, target, io=None):
    load, save = io or (_same, _identity)
    return TensorRule(name, tuple(shape), (target,), load, save)


# --- Llama family (Llama, Mistral, Qwen2) -----------------------------------------------------


def _llama_rules(c: ModelConfig) -> list[TensorRule]:
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    Hq, Hkv, Dh = c.num_heads, c.num_kv_heads, c.head_dim
    rules = [
        _rule("model.embed_tokens.weight", (V, D), ("embed", None)),
        _rule("model.norm.weight", (D,), ("final_norm", None)),
    ]
    if not c.tie_word_embeddings:
        rules.append(_rule("lm_head.weight", (V, D), ("lm_head", None), _linear_in(None, None)))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        rules += [
            _rule(p + "input_layernorm.weight", (D,), ("layers.attn_norm", i)),
            _rule(p + "post_attention_layernorm.weight", (D,), ("layers.mlp_norm", i)),
            _rule(p + "self_attn.q_proj.weight", (Hq * Dh, D), ("layers.q", i), _linear_in(Hq, Dh)),
            _rule(p + "self_attn.k_proj.weight", (Hkv * Dh, D), ("layers.k", i), _linear_in(Hkv, Dh)),
            _rule(p + "self_attn.v_proj.weight", (Hkv * Dh, D), ("layers.v", i), _linear_in(Hkv, Dh)),
            _rule(p + "self_attn.o_proj.weight", (D, Hq * Dh), ("layers.o", i), _linear_out(Hq, Dh)),
            _rule(p + "mlp.gate_proj.weight", (F, D), ("layers.gate", i), _linear_in(None, None)),
            _rule(p + "mlp.up_proj.weight", (F, D), ("layers.up", i), _linear_in(None, None)),
            _rule(p + "mlp.down_proj.weight", (D, F), ("layers.down", i), _linear_in(None, None)),
        ]
        if c.qkv_bias:
            rules += [
                _rule(p + "self_attn.q_proj.bias", (Hq * Dh,), ("layers.q_bias", i), _bias_heads(Hq, Dh)),
                _rule(p + "self_attn.k_proj.bias", (Hkv * Dh,), ("layers.k_bias", i), _bias_heads(Hkv, Dh)),
                _rule(p + "self_attn.v_proj.bias", (Hkv * Dh,), ("layers.v_bias", i), _bias_heads(Hkv, Dh)),
            ]
        if c.out_bias:
            rules.append(_rule(p + "self_attn.o_proj.bias", (D,), ("layers.o_bias", i)))
        if c.mlp_bias:
            rules += [
                _rule(p + "mlp.gate_proj.bias", (F,), ("layers.gate_bias", i)),
                _rule(p + "mlp.up_proj.bias", (F,), ("layers.up_bias", i)),
                _rule(p + "mlp.down_proj.bias", (D,), ("layers.down_bias", i)),
            ]
    return rules


# --- GPT-2 ------------------------------------------------------------------------------------


def _gpt2_rules(c: ModelConfig) -> list[TensorRule]:
    D, F, V, P = c.hidden_size, c.intermediate_size, c.vocab_size, c.max_position_embeddings
    H, Dh = c.num_heads, c.head_dim
    t = "transformer."
    rules = [
        _rule(t + "wte.weight", (V, D), ("embed", None)),
        _rule(t + "wpe.weight", (P, D), ("pos_embed", None)),
        _rule(t + "ln_f.weight", (D,), ("final_norm", None)),
        _rule(t + "ln_f.bias", (D,), ("final_norm_bias", None)),
    ]

    # Conv1D c_attn: (in, 3*out) with q | k | v along the output axis.
    def qkv_load(w):
        return tuple(part.reshape(D, H, Dh) for part in np.split(w, 3, axis=1))

    def qkv_save(q, k, v):
        return np.concatenate([a.reshape(D, H * Dh) for a in (q, k, v)], axis=1)

    def qkv_bias_load(b):
        return tuple(part.reshape(H, Dh) for part in np.split(b, 3))

    def qkv_bias_save(q, k, v):
        return np.concatenate([a.reshape(-1) for a in (q, k, v)])

    conv_out = ((lambda w: (w.reshape(H, Dh, D),)), (lambda w: w.reshape(H * Dh, D)))
    for i in range(c.num_layers):
        p = f"{t}h.{i}."
        rules += [
            _rule(p + "ln_1.weight", (D,), ("layers.attn_norm", i)),
            _rule(p + "ln_1.bias", (D,), ("layers.attn_norm_bias", i)),
            TensorRule(p + "attn.c_attn.weight", (D, 3 * D),
                       (("layers.q", i), ("layers.k", i), ("layers.v", i)), qkv_load, qkv_save),
            TensorRule(p + "attn.c_attn.bias", (3 * D,),
                       tuple((f"layers.{s}_bias", i) for s in ("q", "k", "v")),
                       qkv_bias_load, qkv_bias_save),
            _rule(p + "attn.c_proj.weight", (D, D), ("layers.o", i), conv_out),
            _rule(p + "attn.c_proj.bias", (D,), ("layers.o_bias", i)),
            _rule(p + "ln_2.weight", (D,), ("layers.mlp_norm", i)),
            _rule(p + "ln_2.bias", (D,), ("layers.mlp_norm_bias", i)),
            _rule(p + "mlp.c_fc.weight", (D, F), ("layers.up", i)),
            _rule(p + "mlp.c_fc.bias", (F,), ("layers.up_bias", i)),
            _rule(p + "mlp.c_proj.weight", (F, D), ("layers.down", i)),
            _rule(p + "mlp.c_proj.bias", (D,), ("layers.down_bias", i)),
        ]
    return rules
