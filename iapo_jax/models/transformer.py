"""The one decoder-only transformer behind every role (policy, reference, reward model, scorer).

Two families share the code path:
- llama: RMSNorm -> GQA attention with rotary positions (optional QKV biases) -> RMSNorm -> SwiGLU;
- gpt2:  LayerNorm -> attention with learned positions -> LayerNorm -> GELU MLP, biases everywhere.

Layer parameters are stacked along a leading 'layers' axis and applied with `jax.lax.scan`, so 30
layers compile as one. Inside the scan activations stay flat, [B*T, D], and are reshaped only around
attention (XLA:CPU runs the flat matmuls, and their gradients, markedly faster). Parameters live in
`config.param_dtype`; compute runs in `config.dtype` with float32 norm statistics, softmax and logits.
Every parameter carries logical axis names (`out_sharding` metadata) from the vocabulary in
`LOGICAL_AXES`, which `iapo_jax.parallel` maps to mesh axes.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd

from iapo_jax.models.attention import (
    cache_mask,
    causal_padding_mask,
    default_positions,
    grouped_attention,
)
from iapo_jax.models.config import ModelConfig
from iapo_jax.models.kv_cache import KVCache
from iapo_jax.models.low_rank import dense
from iapo_jax.models.rope import apply_rope, inverse_frequencies, rope_tables

LOGICAL_AXES = ("layers", "vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "position")

# Stacked per-layer parameters, in the order a reader meets them.
LAYER_PARAMS = (
    "attn_norm", "attn_norm_bias", "q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "o_bias",
    "mlp_norm", "mlp_norm_bias", "gate", "gate_bias", "up", "up_bias", "down", "down_bias",
)


def logical_param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    """A Param annotated with logical axis names.

    Names only become a placement when a mesh and logical-axis rules are both in context; without
    them the names are kept as metadata (eager sharding of an unknown axis name would fail).
    """
    eager = bool(nnx.using_eager_sharding() and spmd.get_logical_axis_rules()
                 and jax.sharding.get_abstract_mesh().axis_names)
    return nnx.Param(value, out_sharding=names, eager_sharding=eager)


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, each stacked along a leading 'layers' axis."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
        Hq, Hkv, Dh = c.num_heads, c.num_kv_heads, c.head_dim
        pdt = jnp.dtype(c.param_dtype)
        normal = nnx.initializers.normal(c.initializer_range)
        gpt2 = c.family == "gpt2"

        def weight(shape, names):
            return logical_param(normal(rngs.params(), shape, pdt), names)

        def const(fill, shape, names, present=True):
            return logical_param(jnp.full(shape, fill, pdt), names) if present else None

        self.attn_norm = const(1.0, (L, D), ("layers", "embed"))
        self.attn_norm_bias = const(0.0, (L, D), ("layers", "embed"), gpt2)
        self.q = weight((L, D, Hq, Dh), ("layers", "embed", "q_heads", "head_dim"))
        self.k = weight((L, D, Hkv, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = weight((L, D, Hkv, Dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.q_bias = const(0.0, (L, Hq, Dh), ("layers", "q_heads", "head_dim"), c.qkv_bias)
        self.k_bias = const(0.0, (L, Hkv, Dh), ("layers", "kv_heads", "head_dim"), c.qkv_bias)
        self.v_bias = const(0.0, (L, Hkv, Dh), ("layers", "kv_heads", "head_dim"), c.qkv_bias)
        self.o = weight((L, Hq, Dh, D), ("layers", "q_heads", "head_dim", "embed"))
        self.o_bias = const(0.0, (L, D), ("layers", "embed"), c.out_bias)
        self.mlp_norm = const(1.0, (L, D), ("layers", "embed"))
        self.mlp_norm_bias = const(0.0, (L, D), ("layers", "embed"), gpt2)
        self.gate = None if gpt2 else weight((L, D, F), ("layers", "embed", "mlp"))
        self.gate_bias = const(0.0, (L, F), ("layers", "mlp"), c.mlp_bias and not gpt2)
        self.up = weight((L, D, F), ("layers", "embed", "mlp"))
        self.up_bias = const(0.0, (L, F), ("layers", "mlp"), c.mlp_bias)
        self.down = weight((L, F, D), ("layers", "mlp", "embed"))
        self.down_bias = const(0.0, (L, D), ("layers", "embed"), c.mlp_bias)

    def stacked(self) -> dict[str, jax.Array]:
        """The present parameters as plain arrays, ready to be scanned over."""
        return {n: getattr(self, n)[...] for n in LAYER_PARAMS if getattr(self, n) is not None}


class Transformer(nnx.Module):
    """Decoder-only LM: `model(input_ids, attention_mask)` -> float32 logits [B, T, V]."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        pdt = jnp.dtype(c.param_dtype)
        normal = nnx.initializers.normal(c.initializer_range)
        gpt2 = c.family == "gpt2"
        D = c.hidden_size
        self.embed = logical_param(normal(rngs.params(), (c.vocab_size, D), pdt), ("vocab", "embed"))
        self.pos_embed = (
            logical_param(normal(rngs.params(), (c.max_position_embeddings, D), pdt),
                          ("position", "embed"))
            if gpt2 else None
        )
        self.layers = DecoderLayers(c, rngs)
        self.final_norm = logical_param(jnp.ones((D,), pdt), ("embed",))
        self.final_norm_bias = logical_param(jnp.zeros((D,), pdt), ("embed",)) if gpt2 else None
        self.lm_head = (
            None if c.tie_word_embeddings
            else logical_param(normal(rngs.params(), (D, c.vocab_size), pdt), ("embed", "vocab"))
        )

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        """input_ids [B,T] int, attention_mask [B,T] (1 = real token) -> logits [B,T,V] float32."""
        return self.logits_from_hidden(self.hidden(input_ids, attention_mask, positions))

    def hidden(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        """Final-normed hidden states [B,T,D] in the compute dtype."""
        input_ids = self._check_ids(input_ids)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, T)} "
                             "like input_ids.")
        positions = default_positions(attention_mask) if positions is None else jnp.asarray(positions)
        mask = causal_padding_mask(attention_mask)

        def keys_values(k, v, layer_carry):
            return k, v, mask, layer_carry

        x = self._embed(input_ids, positions)
        x, _ = self._scan_layers(x, positions, keys_values, None)
        return self._final_norm(x).reshape(B, T, -1)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Apply the LM head to hidden states [..., D] -> float32 logits [..., V]."""
        dt = jnp.dtype(self.config.dtype)
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.matmul(h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """An empty cache of `slots` positions per row (dtype defaults to the compute dtype)."""
        c = self.config
        dtype = jnp.dtype(dtype or c.dtype)
        return KVCache.zeros(c.num_layers, batch, slots, c.num_kv_heads, c.head_dim, dtype)

    def forward_cached(self, input_ids, positions, token_mask, cache: KVCache):
        """Run T new tokens per row against the cache -> (final-normed hidden [B,T,D], new cache).

        The new keys/values go to slots cache.index .. cache.index+T-1 (the same slots for every
        row); `token_mask` marks which of them are real. Each new token attends to valid slots up
        to its own. Prefill is T prompt tokens into an empty cache, decode is T = 1.
        """
        input_ids = self._check_ids(input_ids)
        B, T = input_ids.shape
        if cache.k.shape[1] != B:
            raise ValueError(f"cache holds {cache.k.shape[1]} rows but input_ids has {B}; "
                             "build it with init_cache(batch) or KVCache.repeat/take.")
        if T > cache.slots:
            raise ValueError(f"{T} new tokens do not fit a cache of {cache.slots} slots; "
                             "use a larger init_cache(slots=...).")
        if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + T > cache.slots:
            raise ValueError(f"cache is full: index {int(cache.index)} + {T} new tokens > "
                             f"{cache.slots} slots; use a larger init_cache(slots=...).")
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, jnp.asarray(token_mask).astype(bool),
                                             (0, index))
        mask = cache_mask(valid, index, T)

        def keys_values(k, v, layer_carry):
            layer, ck, cv = layer_carry
            # Write this layer's new entries in place into the full cache carried by the scan.
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (layer, 0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (layer, 0, index, 0, 0))
            keys = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False).astype(k.dtype)
            values = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False).astype(v.dtype)
            return keys, values, mask, (layer + 1, ck, cv)

        positions = jnp.asarray(positions)
        x = self._embed(input_ids, positions)
        x, (_, k, v) = self._scan_layers(x, positions, keys_values, (jnp.int32(0), cache.k, cache.v))
        new_cache = cache.replace(k=k, v=v, valid=valid, index=index + T)
        return self._final_norm(x).reshape(B, T, -1), new_cache

    # ------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------

    def _check_ids(self, input_ids) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be a [batch, length] integer array, got shape "
                             f"{input_ids.shape} dtype {input_ids.dtype}.")
        c = self.config
        if c.family == "gpt2" and input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the {c.max_position_embeddings} "
                             "learned positions of this GPT-2 model; shorten the input.")
        return input_ids

    def _embed(self, input_ids, positions) -> jax.Array:
        """Token (+ learned position) embeddings, flat [B*T, D] in the compute dtype."""
        dt = jnp.dtype(self.config.dtype)
        x = jnp.take(self.embed[...], input_ids.reshape(-1), axis=0).astype(dt)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions.reshape(-1), axis=0).astype(dt)
        return x

    def _final_norm(self, x):
        bias = None if self.final_norm_bias is None else self.final_norm_bias[...]
        return _norm(self.config, x, self.final_norm[...], bias)

    def _scan_layers(self, x, positions, keys_values: Callable, carry_extra):
        c = self.config
        B, T = positions.shape
        rope = rope_tables(positions, _inv_freq(c)) if c.family == "llama" else None
        dt = jnp.dtype(c.dtype)

        def body(carry, w):
            x, extra = carry
            w = {name: a.astype(dt) for name, a in w.items()}  # one layer at a time
            x, extra = _decoder_layer(c, x, w, rope, B, T, keys_values, extra)
            return (x, extra), None

        (x, extra), _ = jax.lax.scan(body, (x, carry_extra), self.layers.stacked())
        return x, extra


@functools.lru_cache(maxsize=32)
def _inv_freq(config: ModelConfig) -> np.ndarray:
    return inverse_frequencies(config)


# ----------------------------------------------------------------------------------------------
# One decoder layer as a pure function of flat activations [N = B*T, D] and one layer's weights.
# ----------------------------------------------------------------------------------------------


def _decoder_layer(c: ModelConfig, x, w, rope, B, T, keys_values, extra):
    h = _norm(c, x, w["attn_norm"], w.get("attn_norm_bias"))
    attn, extra = _attention(c, h, w, rope, B, T, keys_values, extra)
    x = x + attn
    h = _norm(c, x, w["mlp_norm"], w.get("mlp_norm_bias"))
    return x + _mlp(c, h, w), extra


def _attention(c: ModelConfig, h, w, rope, B, T, keys_values, extra):
    Hkv, G, Dh = c.num_kv_heads, c.num_groups, c.head_dim
    q = dense(h, w["q"], w.get("q_bias")).reshape(B, T, Hkv, G, Dh)
    k = dense(h, w["k"], w.get("k_bias")).reshape(B, T, Hkv, Dh)
    v = dense(h, w["v"], w.get("v_bias")).reshape(B, T, Hkv, Dh)
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values, mask, extra = keys_values(k, v, extra)
    out = grouped_attention(q, keys, values, mask, scale=Dh**-0.5)
    return dense(out.reshape(B * T, -1), w["o"], w.get("o_bias")), extra


def _mlp(c: ModelConfig, h, w):
    up = dense(h, w["up"], w.get("up_bias"))
    if c.family == "llama":
        gate = dense(h, w["gate"], w.get("gate_bias"))
        act = _activation(c.activation, gate.astype(jnp.float32)).astype(h.dtype) * up
    else:
        act = _activation(c.activation, up.astype(jnp.float32)).astype(h.dtype)
    return dense(act, w["down"], w.get("down_bias"))


def _activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


def _norm(c: ModelConfig, x, scale, bias=None):
    """RMSNorm (llama) or LayerNorm (gpt2), statistics in float32, output in x's dtype."""
    x32 = x.astype(jnp.float32)
    if c.family == "gpt2":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.norm_eps)
    y = y.astype(x.dtype) * scale.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)
