"""Model hyper-parameters, read from and written back to Hugging Face `config.json` dictionaries.

One frozen dataclass describes both supported families:
- 'llama': RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention (Llama, Mistral without a
  sliding window, Qwen2 with its QKV biases);
- 'gpt2': LayerNorm, GELU MLP, learned positions, biases everywhere, tied head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from iapo_jax.errors import CheckpointError

FAMILIES = ("llama", "gpt2")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")

# HF `model_type` -> (family, architecture class written back by `to_hf`).
HF_MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("llama", "MistralForCausalLM"),
    "qwen2": ("llama", "Qwen2ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}
_HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {'rope_type': 'linear'|'llama3', 'factor': ..., ...}
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax, norm statistics and logits stay float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Additions beyond the shared interface.
    out_bias: bool = False  # bias on the attention output projection (GPT-2, Llama attention_bias)
    mlp_bias: bool = False
    activation: str = "silu"
    hf_model_type: str | None = None  # the HF model_type this came from, so `to_hf` writes it back
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    def __hash__(self):
        # rope_scaling is a dict; hash its items so the config can sit in a static graph definition.
        fields = dataclasses.astuple(self)
        scaling = tuple(sorted((self.rope_scaling or {}).items()))
        return hash(tuple(f for f in fields if not isinstance(f, dict)) + (scaling,))

    def validate(self) -> None:
        def bad(problem: str, fix: str):
            raise ValueError(f"ModelConfig: {problem}. {fix}")

        if self.family not in FAMILIES:
            bad(f"unknown family {self.family!r}", f"Use one of {FAMILIES}.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"{name}={getattr(self, name)!r} is not supported", f"Use one of {DTYPES}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}", "Fix the config.")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
                "Grouped-query attention needs whole groups; fix the head counts.")
        if self.family == "llama" and self.head_dim % 2:
            bad(f"rotary embeddings need an even head_dim, got {self.head_dim}", "Fix head_dim.")
        if self.activation not in ACTIVATIONS:
            bad(f"activation {self.activation!r} is not supported", f"Use one of {ACTIVATIONS}.")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                bad(f"rope scaling type {kind!r} is not supported",
                    f"Supported: {ROPE_TYPES} ('dynamic' and 'yarn' are not implemented).")
            if kind != "default" and "factor" not in self.rope_scaling:
                bad(f"rope scaling {kind!r} needs a 'factor'", "Add it to rope_scaling.")
            if kind == "llama3":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        bad(f"llama3 rope scaling needs {key!r}", "Add it to rope_scaling.")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, *, source: str = "config.json", **overrides: Any) -> "ModelConfig":
        """Build from a transformers `config.json` dict; `source` names the file in error messages."""
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            archs = hf.get("architectures")
            raise CheckpointError(
                f"{source}: unsupported architecture (model_type={model_type!r}, "
                f"architectures={archs}). Supported model_type values: {sorted(HF_MODEL_TYPES)}."
            )
        family = HF_MODEL_TYPES[model_type][0]
        try:
            kwargs = _gpt2_kwargs(hf, source) if family == "gpt2" else _llama_kwargs(hf, model_type, source)
        except KeyError as missing:
            raise CheckpointError(f"{source}: required field {missing} is missing.") from None
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        kwargs.update(
            family=family,
            hf_model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        """A transformers `config.json` dict that loads these weights with the same logits."""
        model_type = self.hf_model_type or self.family
        arch = HF_MODEL_TYPES[model_type][1]
        common = {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "dtype": self.param_dtype,
        }
        if self.family == "gpt2":
            return common | {
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": {"gelu_tanh": "gelu_new"}.get(self.activation, self.activation),
                "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False,
            }
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        rope.update({k: v for k, v in (self.rope_scaling or {}).items() if k not in ("type", "rope_type")})
        out = common | {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": self.activation,
            "rope_parameters": rope,
        }
        if model_type == "qwen2":
            if not self.qkv_bias or self.out_bias or self.mlp_bias:
                raise ValueError("A qwen2 checkpoint has QKV biases only; this config differs. "
                                 "Set hf_model_type='llama' to write it as a Llama checkpoint.")
        elif self.qkv_bias != self.out_bias:
            raise ValueError(
                f"{arch} has one attention_bias flag for q, k, v and o; this config has "
                f"qkv_bias={self.qkv_bias}, out_bias={self.out_bias}. Set hf_model_type='qwen2' "
                "for QKV-only biases.")
        else:
            out |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        return out


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """transformers 5 writes rope_parameters (theta inside); older versions rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or legacy
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _llama_kwargs(hf: dict, model_type: str, source: str) -> dict:
    window = hf.get("sliding_window")
    max_len = int(hf.get("max_position_embeddings", 2048))
    if window and window < max_len and hf.get("use_sliding_window", model_type == "mistral"):
        raise CheckpointError(
            f"{source}: sliding-window attention (sliding_window={hf['sliding_window']}) is not "
            "supported. Use a checkpoint with full attention.")
    act = hf.get("hidden_act", "silu")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported.")
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope_from_hf(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        max_position_embeddings=max_len,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        activation=_HF_ACTIVATIONS[act],
    )


def _gpt2_kwargs(hf: dict, source: str) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError(f"{source}: GPT-2 attention scaling variants (scale_attn_by_inverse_"
                              "layer_idx, scale_attn_weights=False) are not supported.")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported.")
    d, heads = int(hf["n_embd"]), int(hf["n_head"])
    return dict(
        hidden_size=d,
        intermediate_size=int(hf.get("n_inner") or 4 * d),
        num_layers=int(hf["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        max_position_embeddings=int(hf["n_positions"]),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=True,  # GPT2LMHeadModel always ties its head to wte
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        activation=_HF_ACTIVATIONS[act],
    )
