"""Prefix scorers for controlled decoding: CD-FUDGE and CD-Q training (arXiv 2310.17022).

The scorer is a ValueModel (``iapo_jax.models.heads``): the shared backbone with a scalar head read
at every position, so one forward pass over [x, y] gives V([x, y^t]) for every prefix. It plugs
into the decoding engine's scorer protocol as it is (``values_cached`` on its own KV cache), for
blockwise CD and token-level CD alike. A vocabulary-sized Q head would make CD-Q targets one
forward pass, but it cannot score a prefix from its own last token, which is what the decoding
engine's cached protocol asks of a scorer; so CD-Q targets are computed instead by running the k
candidate next tokens of every prefix through the backbone on a KV cache (``candidate_hidden``):
one lax.scan over response positions, all prefixes' candidates in one batched call per position.

Losses (``alignment.losses``), with V_t = V([x, y^t]) for t = 0 (the empty response) .. len(y):
- CD-FUDGE, on rollouts y ~ pi_ref: 1/2 sum_t (V_t - r(x, y))^2;
- CD-Q: 1/2 sum_t (V_t - stopgrad(v_t))^2, v_t = sum_z pi_ref(z | x, y^t) V([x, y^t, z]) before the
  end and r(x, y) at the final prefix. top_k=None sums over the whole vocabulary (exact; affordable
  for small vocabularies); top_k=k keeps pi_ref's k most likely tokens, renormalised.
Training modes, the optimizer and the loop are shared with reward models (``head_trainer``); in mode
'head' the backbone is frozen, so hidden states (and CD-Q candidate states) are computed once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from iapo_jax.alignment import losses
from iapo_jax.alignment.head_trainer import HeadTrainConfig, HeadTrainer
from iapo_jax.alignment.prefix_rollouts import Rollouts, check_rollouts, response_mask
from iapo_jax.decoding.loop import prompt_positions
from iapo_jax.decoding.scorers import take_slots
from iapo_jax.models.finetune import Finetune, merged_state, project, trainable_head
from iapo_jax.runtime.fixed_chunks import map_fixed_chunks

METHODS = ("fudge", "cdq")


# ----------------------------------------------------------------------------------------------
# Prefix values and CD-Q candidates (pure functions of a model and arrays)
# ----------------------------------------------------------------------------------------------


def prefix_hidden(backbone, prompt_ids, prompt_mask, tokens, lengths) -> jax.Array:
    """Hidden states of prefixes y^0 .. y^R -> [B, R+1, D] (entry t ends at response token t)."""
    p = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), response_mask(lengths, tokens.shape[1])], axis=1)
    h = backbone.hidden(ids, mask, prompt_positions(mask))
    return h[:, p - 1:]


def prefix_values(model, prompt_ids, prompt_mask, tokens, lengths) -> jax.Array:
    """V([x, y^t]) for t = 0 .. R from a ValueModel -> float32 [B, R+1]."""
    p = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), response_mask(lengths, tokens.shape[1])], axis=1)
    return model.values(ids, mask, prompt_positions(mask))[:, p - 1:]


def prefix_masks(lengths, response_len: int) -> tuple[jax.Array, jax.Array]:
    """(real prefixes t <= len [B, R+1] float32, final prefix t == len [B, R+1] bool)."""
    t = jnp.arange(response_len + 1)[None, :]
    lengths = jnp.asarray(lengths)[:, None]
    return (t <= lengths).astype(jnp.float32), t == lengths


def candidate_hidden(backbone, prompt_ids, prompt_mask, tokens, lengths, candidates):
    """Hidden states of [x, y^t, z] for each prefix t < R and candidate z = candidates[:, t, j].

    candidates: [B, R, k] int32. Returns (h [B, R, k, D], h_next [B, R, D]), h_next being the state
    of the actual next token y_{t+1} (it equals prefix_hidden[:, 1:], a built-in check). Each scan
    step feeds k + 1 copies of every row one token (the actual token in copy 0), then copies copy
    0's new cache slot into all copies so the next step continues the real response.
    """
    b, p = prompt_ids.shape
    r, k = tokens.shape[1], candidates.shape[2]
    c = k + 1
    cache = backbone.init_cache(b, p + r)
    _, cache = backbone.forward_cached(prompt_ids, prompt_positions(prompt_mask), prompt_mask, cache)
    cache = cache.repeat(c)
    prompt_len = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    actual_rows = jnp.repeat(jnp.arange(b) * c, c)

    def body(cache, t):
        step_tokens = jnp.concatenate([tokens[:, t][:, None], candidates[:, t]], axis=1)
        real = jnp.repeat(t < lengths, c)[:, None]
        h, cache = backbone.forward_cached(step_tokens.reshape(b * c, 1),
                                           jnp.repeat(prompt_len + t, c)[:, None], real, cache)
        cache = take_slots(cache, actual_rows, cache.index - 1, 1)
        return cache, h.reshape(b, c, -1).astype(jnp.float32)

    _, hs = lax.scan(body, cache, jnp.arange(r))  # [R, B, c, D]
    hs = jnp.swapaxes(hs, 0, 1)
    return hs[:, :, 1:], hs[:, :, 0]


def next_token_distribution(reference, prompt_ids, prompt_mask, tokens, lengths, top_k: int | None):
    """pi_ref's next-token candidates after each prefix y^t, t < R -> (ids [B,R,k], probs [B,R,k]).

    top_k=None: the whole vocabulary with exact probabilities; else the k most likely tokens with
    probabilities renormalised over them.
    """
    h = prefix_hidden(reference, prompt_ids, prompt_mask, tokens, lengths)[:, :-1]
    logits = reference.logits_from_hidden(h)
    if top_k is None:
        v = logits.shape[-1]
        ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), logits.shape)
        return ids, jax.nn.softmax(logits, axis=-1)
    ids, probs = losses.renormalised_top_k(logits, top_k)
    return ids.astype(jnp.int32), probs


def pad_last_prefix(x: jax.Array) -> jax.Array:
    """[B, R, ...] per prefix t < R -> [B, R+1, ...] with zeros for t = R (it is always final)."""
    pad = [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScorerTrainConfig(HeadTrainConfig):
    """Prefix-scorer training settings; method 'fudge' (on-policy) or 'cdq' (Bellman targets)."""

    method: str = "fudge"
    top_k: int | None = None  # CD-Q: None = exact full-vocabulary expectation

    def validate(self) -> "ScorerTrainConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown prefix-scorer method {self.method!r}; choose one of {METHODS}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, or None for the exact expectation (got {self.top_k})")
        return super().validate()


def scorer_loss(values, rewards, lengths, method: str, next_values=None, next_probs=None):
    """The CD-FUDGE or CD-Q loss of prefix values [B, R+1] (next_*: [B, R, k] for CD-Q)."""
    mask, is_last = prefix_masks(lengths, values.shape[1] - 1)
    if method == "fudge":
        return losses.cd_fudge_loss(values, rewards, mask)
    return losses.cd_q_loss(values, pad_last_prefix(next_values), pad_last_prefix(next_probs), rewards,
                            is_last, mask)


def prefix_scorer_loss(graphdef, finetune: Finetune, method: str, on_features: bool = False):
    """loss(trainable, frozen, batch) -> (loss, metrics), pure.

    batch: a dict with 'prompt_ids', 'prompt_mask', 'tokens', 'lengths', 'rewards' and, for CD-Q,
    'cand_ids' / 'cand_probs' [B, R, k]; with ``on_features`` (mode 'head') 'h' [B, R+1, D] and,
    for CD-Q, 'h_cand' [B, R, k, D] replace the token arrays. CD-Q targets use the current weights
    and carry no gradient.
    """

    def model_of(trainable, frozen):
        return nnx.merge(graphdef, merged_state(frozen, trainable, finetune, factored=True))

    def targets(trainable, frozen, batch):
        if method != "cdq":
            return None
        if on_features:
            return project(trainable, batch["h_cand"])
        params = jax.lax.stop_gradient(trainable)
        model = model_of(params, frozen)
        h, _ = candidate_hidden(model.backbone, batch["prompt_ids"], batch["prompt_mask"], batch["tokens"],
                                batch["lengths"], batch["cand_ids"])
        return project(trainable_head(params, finetune), h)

    def loss_fn(trainable, frozen, batch):
        if on_features:
            values = project(trainable, batch["h"])
        else:
            values = prefix_values(model_of(trainable, frozen), batch["prompt_ids"], batch["prompt_mask"],
                                   batch["tokens"], batch["lengths"])
        next_values = targets(trainable, frozen, batch)
        loss = scorer_loss(values, batch["rewards"], batch["lengths"], method, next_values,
                           batch.get("cand_probs"))
        mask, _ = prefix_masks(batch["lengths"], values.shape[1] - 1)
        mse = jnp.sum(jnp.square(values - batch["rewards"][:, None]) * mask) / jnp.sum(mask)
        return loss, {"loss": loss, "mse_to_reward": mse}

    return loss_fn


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefix_hidden_jit(graphdef, state, prompt_ids, prompt_mask, tokens, lengths):
    return prefix_hidden(nnx.merge(graphdef, state), prompt_ids, prompt_mask, tokens, lengths).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _candidate_hidden_jit(graphdef, state, prompt_ids, prompt_mask, tokens, lengths, candidates):
    return candidate_hidden(nnx.merge(graphdef, state), prompt_ids, prompt_mask, tokens, lengths, candidates)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _next_tokens_jit(graphdef, state, prompt_ids, prompt_mask, tokens, lengths, *, top_k):
    return next_token_distribution(nnx.merge(graphdef, state), prompt_ids, prompt_mask, tokens, lengths, top_k)


class PrefixScorerTrainer(HeadTrainer):
    """Trains a ValueModel as a CD-FUDGE or CD-Q prefix scorer on scored rollouts.

    reference: pi_ref (a Transformer), needed for CD-Q's next-token distribution. The model passed
    in is left untouched; `current_model()` returns the trained scorer, ready for
    ``decoding.blockwise_cd`` / ``decoding.token_cd``. The loop, checkpoints and mesh placement
    are ``HeadTrainer``'s (see there for checkpointer and mesh).
    """

    def __init__(self, cfg: ScorerTrainConfig, model, train: Rollouts, eval_data: Rollouts | None = None,
                 *, reference=None, checkpointer=None, log: Callable[..., None] | None = None, mesh=None):
        cfg = self.check_common(cfg, mesh)
        if not hasattr(model, "values_cached"):
            raise TypeError(f"PrefixScorerTrainer needs a ValueModel, got {type(model).__name__}")
        if cfg.method == "cdq" and reference is None:
            raise ValueError("CD-Q needs pi_ref's next-token probabilities: pass reference= (the base model)")
        check_rollouts(train)
        if train.size < 1:
            raise ValueError("no rollouts to train on; sample some with sample_rollouts")
        if eval_data is not None:
            check_rollouts(eval_data)
        if reference is not None and reference.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"reference vocabulary ({reference.config.vocab_size}) differs from the "
                             f"scorer's ({model.config.vocab_size}); start the scorer from pi_ref")
        self.train_data, self.eval_data = train.as_numpy(), eval_data
        self.reference = reference
        super().__init__(cfg, model, checkpointer=checkpointer, log=log, mesh=mesh)
        self._arrays = self._prepare(self.train_data)
        self.place_state()
        self._eval_features: dict[int, tuple] = {}  # mode 'head': (data, frozen states) per data set

    def loss_fn(self):
        return prefix_scorer_loss(self.graphdef, self.finetune, self.cfg.method, self.on_features)

    @property
    def train_size(self) -> int:
        return self.train_data.size

    def batch(self, idx) -> dict:
        return {k: jnp.asarray(v[idx]) for k, v in self._arrays.items()}

    def eval_metrics(self) -> dict[str, float]:
        return {"eval_mse": self.evaluate()["mse"]}

    # -- data -----------------------------------------------------------------------------------
    def _backbone_state(self):
        return nnx.split(self.current_model().backbone)

    def _prepare(self, data: Rollouts) -> dict:
        """Host arrays for the steps: tokens (+ CD-Q candidates), or frozen features in mode 'head'."""
        bs = self.cfg.eval_batch_size
        rows = (data.prompt_ids, data.prompt_mask, data.tokens, data.lengths)
        arrays = {"prompt_ids": data.prompt_ids, "prompt_mask": data.prompt_mask, "tokens": data.tokens,
                  "lengths": data.lengths, "rewards": data.rewards}
        if self.cfg.method == "cdq":
            rg, rs = nnx.split(self.reference)
            ids, probs = map_fixed_chunks(functools.partial(_next_tokens_jit, rg, rs, top_k=self.cfg.top_k), rows, bs)
            arrays["cand_ids"], arrays["cand_probs"] = np.asarray(ids), np.asarray(probs)
        if self.on_features:
            g, s = self._backbone_state()
            arrays["h"] = np.asarray(map_fixed_chunks(functools.partial(_prefix_hidden_jit, g, s), rows, bs))
            if self.cfg.method == "cdq":
                arrays["h_cand"] = np.asarray(map_fixed_chunks(functools.partial(_candidate_hidden_jit, g, s),
                                                               rows + (arrays["cand_ids"],), bs))
            for key in ("prompt_ids", "prompt_mask", "tokens", "cand_ids"):
                arrays.pop(key, None)
        return arrays

    # -- evaluation -----------------------------------------------------------------------------
    def values(self, data: Rollouts) -> np.ndarray:
        """V([x, y^t]) for t = 0 .. R under the current weights -> [B, R+1]."""
        if self.on_features:
            if data is self.train_data:
                feats = self._arrays["h"]
            else:
                cached = self._eval_features.get(id(data))
                if cached is None or cached[0] is not data:  # keep the data alive: ids stay unique
                    g, s = self._backbone_state()
                    rows = (data.prompt_ids, data.prompt_mask, data.tokens, data.lengths)
                    cached = (data, np.asarray(map_fixed_chunks(functools.partial(_prefix_hidden_jit, g, s), rows,
                                                       self.cfg.eval_batch_size)))
                    self._eval_features[id(data)] = cached
                feats = cached[1]
            return np.asarray(project(jax.device_get(self.trainable), jnp.asarray(feats)))
        g, s = nnx.split(self.current_model())
        fn = functools.partial(_values_jit, g, s)
        return np.asarray(map_fixed_chunks(fn, (data.prompt_ids, data.prompt_mask, data.tokens, data.lengths),
                                  self.cfg.eval_batch_size))

    def evaluate(self, data: Rollouts | None = None, edges=None) -> dict:
        """MSE of V([x, y^t]) to r(x, y) overall and by prefix length (see prefix_scorer_eval)."""
        from iapo_jax.alignment.prefix_scorer_eval import mse_by_prefix_length

        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("no evaluation rollouts; pass eval_data to the trainer or data= here")
        return mse_by_prefix_length(self.values(data), np.asarray(data.rewards), np.asarray(data.lengths),
                                    edges=edges, baseline=float(np.mean(self.train_data.rewards)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _values_jit(graphdef, state, prompt_ids, prompt_mask, tokens, lengths):
    return prefix_values(nnx.merge(graphdef, state), prompt_ids, prompt_mask, tokens, lengths)
