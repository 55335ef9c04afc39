"""Scalar heads on the shared transformer backbone.

- RewardModel: one score per sequence, for Bradley-Terry reward models. Pooling 'last' reads the
  row's last real token (found from the attention mask, i.e. from lengths, never from pad-token
  values); 'mean' averages the head over every real token.
- ValueModel: one score per prefix position, for prefix scorers / value functions (CD-FUDGE, CD-Q);
  `values_cached` scores new tokens incrementally on a KV cache during decoding.

Both read final-normed hidden states (no LM head) and compute the head in float32. `from_policy`
starts the backbone from a policy's weights (new Variables, so training one never moves the other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from iapo_jax.models.config import ModelConfig
from iapo_jax.models.kv_cache import KVCache
from iapo_jax.models.transformer import Transformer, logical_param


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """[B,T] mask -> [B] index of the last real token (left or right padding alike)."""
    mask = jnp.asarray(attention_mask).astype(bool)
    length = mask.shape[1]
    return (length - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


POOLINGS = ("last", "mean")


def pool_hidden(h: jax.Array, attention_mask: jax.Array, pooling: str = "last") -> jax.Array:
    """[B,T,D] hidden states -> [B,D]: the last real token's state, or the mean over real tokens.

    'mean' suits scores that add up over words (a sentiment lexicon, say): the head is linear, so
    the pooled score is the mean of per-token scores. Under causal attention the prompt's states do
    not depend on the response, so two responses to one prompt differ only through their own tokens.
    """
    mask = jnp.asarray(attention_mask).astype(bool)
    if pooling == "last":
        return jnp.take_along_axis(h, last_token_index(mask)[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        total = jnp.sum(h.astype(jnp.float32) * weights, axis=1)
        return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class _ScalarHeadModel(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, head_init_std: float = 0.0,
                 backbone: Transformer | None = None):
        self.backbone = backbone if backbone is not None else Transformer(config, rngs=rngs)
        d = config.hidden_size
        pdt = jnp.dtype(config.param_dtype)
        init = (nnx.initializers.normal(head_init_std)(rngs.params(), (d,), pdt)
                if head_init_std > 0 else jnp.zeros((d,), pdt))
        self.head = logical_param(init, ("embed",))
        self.head_bias = logical_param(jnp.zeros((), pdt), ())

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @classmethod
    def from_policy(cls, transformer: Transformer, rngs: nnx.Rngs, head_init_std: float = 0.0, **kwargs):
        """A head model whose backbone starts as a copy of `transformer`'s weights."""
        if not isinstance(transformer, Transformer):
            raise TypeError(f"from_policy expects a Transformer, got {type(transformer).__name__}.")
        return cls(transformer.config, rngs, head_init_std, backbone=nnx.clone(transformer), **kwargs)

    def _project(self, h: jax.Array) -> jax.Array:
        """Hidden states [..., D] -> float32 scores [...]."""
        w = self.head[...].astype(jnp.float32)
        return h.astype(jnp.float32) @ w + self.head_bias[...].astype(jnp.float32)


class RewardModel(_ScalarHeadModel):
    """Backbone + scalar head; `score` gives one reward per sequence (see `pool_hidden`)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs, head_init_std: float = 0.0,
                 backbone: Transformer | None = None, pooling: str = "last"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        super().__init__(config, rngs, head_init_std, backbone)
        self.pooling = pooling

    def score(self, input_ids, attention_mask) -> jax.Array:
        """input_ids [B,T], attention_mask [B,T] (1 = real token) -> float32 scores [B]."""
        h = self.backbone.hidden(input_ids, attention_mask)
        return self._project(pool_hidden(h, attention_mask, self.pooling))

    def __call__(self, input_ids, attention_mask) -> jax.Array:
        return self.score(input_ids, attention_mask)


class ValueModel(_ScalarHeadModel):
    """Backbone + scalar head; `values` gives one score per prefix (token position)."""

    def values(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        """-> float32 [B,T]; entry t scores the prefix ending at token t."""
        return self._project(self.backbone.hidden(input_ids, attention_mask, positions))

    def values_cached(self, input_ids, positions, token_mask, cache: KVCache):
        """Score T new tokens against a KV cache -> (float32 [B,T], new cache)."""
        h, cache = self.backbone.forward_cached(input_ids, positions, token_mask, cache)
        return self._project(h), cache

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        return self.backbone.init_cache(batch, slots, dtype)

    def __call__(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        return self.values(input_ids, attention_mask, positions)
