"""Bradley-Terry reward-model training: a jit-compiled pure step, a trainer, held-out accuracy.

Pairs (``rewards.preference_pairs``) are tokenised like the reward adapter tokenises at scoring
time (``rewards.reward_model.sequence_ids``), so a model trained here scores served responses the
same way. One step scores chosen and rejected rows in a single forward pass and minimises

    -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m) [+ center_coef * mean((r_c + r_r)^2)]

with m = margin + margin_from_gap * (the ranking scorer's gap) (``alignment.losses``), using AdamW
on a warmup-cosine schedule. In mode 'head' (``models.finetune``) the backbone is frozen, so the
pooled hidden states (``heads.pool_hidden``) are computed once and each step trains the head on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from iapo_jax.alignment import losses
from iapo_jax.alignment.head_trainer import HeadTrainConfig, HeadTrainer
from iapo_jax.models.finetune import Finetune, merged_state, project
from iapo_jax.models.heads import pool_hidden
from iapo_jax.rewards.preference_pairs import Preference
from iapo_jax.rewards.reward_model import score_arrays, sequence_ids, width_for
from iapo_jax.runtime.fixed_chunks import map_fixed_chunks

@struct.dataclass
class PairArrays:
    """Tokenised pairs: left-padded rows ending with the end-of-turn token."""

    chosen_ids: jax.Array  # [N, W] int32
    chosen_mask: jax.Array  # [N, W] bool
    rejected_ids: jax.Array  # [N, W]
    rejected_mask: jax.Array  # [N, W]
    gap: jax.Array  # [N] float32, the ranking scorer's gap (0 when unknown)

    @property
    def size(self) -> int:
        return int(self.chosen_ids.shape[0])

    def take(self, idx) -> "PairArrays":
        return jax.tree.map(lambda x: x[idx], self)


def encode_preferences(tokenizer, pairs: Sequence[Preference], max_length: int,
                       width: int | None = None, system_prompt: str | None = None) -> tuple[PairArrays, int]:
    """-> (PairArrays as numpy, number of rows whose prompt start was cut to fit max_length)."""
    from iapo_jax.data.tokenize import left_pad, left_padded_mask

    if not pairs:
        raise ValueError("no preference pairs to encode; sample more prompts or relax min_gap")
    prompts = [p.prompt for p in pairs]
    chosen, cut_c = sequence_ids(tokenizer, prompts, [p.chosen for p in pairs], max_length, system_prompt)
    rejected, cut_r = sequence_ids(tokenizer, prompts, [p.rejected for p in pairs], max_length,
                                   system_prompt)
    longest = max(len(s) for s in chosen + rejected)
    width = width or width_for([longest], max_length)
    if longest > width:
        raise ValueError(f"a pair has {longest} tokens but width is {width}; raise the width")
    c_ids, c_len = left_pad(chosen, width, 0)
    r_ids, r_len = left_pad(rejected, width, 0)
    arrays = PairArrays(c_ids, left_padded_mask(c_len, width), r_ids, left_padded_mask(r_len, width),
                        np.asarray([p.gap for p in pairs], np.float32))
    return arrays, max(cut_c, cut_r)


def encode_preference_splits(tokenizer, splits: Sequence[Sequence[Preference]], max_length: int,
                             system_prompt: str | None = None) -> tuple[list[PairArrays], int]:
    """Encode several pair sets (train, held-out, ...) to one common width (one compiled program)."""
    lengths = []
    for pairs in splits:
        prompts = [p.prompt for p in pairs]
        for texts in ([p.chosen for p in pairs], [p.rejected for p in pairs]):
            lengths += [len(s) for s in sequence_ids(tokenizer, prompts, texts, max_length, system_prompt)[0]]
    width = width_for(lengths, max_length)
    out = [encode_preferences(tokenizer, pairs, max_length, width, system_prompt) for pairs in splits]
    return [a for a, _ in out], sum(c for _, c in out)


@dataclasses.dataclass(frozen=True)
class RewardTrainConfig(HeadTrainConfig):
    """Bradley-Terry training settings (see the module docstring for the loss)."""

    margin: float = 0.0
    margin_from_gap: float = 0.0
    center_coef: float = 0.0

    def validate(self) -> "RewardTrainConfig":
        if self.center_coef < 0:
            raise ValueError(f"center_coef must be >= 0 (got {self.center_coef})")
        return super().validate()


def bt_scores_and_loss(chosen, rejected, gap, margin, margin_from_gap, center_coef: float):
    """Bradley-Terry loss and metrics from scores; the margin is traced, the centering static."""
    m = margin + margin_from_gap * gap
    loss = losses.bradley_terry_loss(chosen, rejected, m, center_coef)
    metrics = {"loss": loss, "accuracy": losses.pairwise_accuracy(chosen, rejected),
               "reward_gap": jnp.mean(chosen - rejected), "reward_mean": jnp.mean(chosen + rejected) / 2}
    return loss, metrics


def bt_loss(graphdef, finetune: Finetune, center_coef: float = 0.0, on_features: bool = False):
    """loss(trainable, frozen, batch, margin, margin_from_gap) -> (loss, metrics), pure.

    batch: PairArrays, or with ``on_features`` a tuple (h_chosen [B, D], h_rejected [B, D], gap [B])
    of frozen-backbone pooled hidden states (mode 'head').
    """

    def loss_fn(trainable, frozen, batch, margin, margin_from_gap):
        if on_features:
            h_c, h_r, gap = batch
            rc, rr = project(trainable, h_c), project(trainable, h_r)
        else:
            model = nnx.merge(graphdef, merged_state(frozen, trainable, finetune, factored=True))
            ids = jnp.concatenate([batch.chosen_ids, batch.rejected_ids])
            mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
            rc, rr = jnp.split(model.score(ids, mask), 2)
            gap = batch.gap
        return bt_scores_and_loss(rc, rr, gap, margin, margin_from_gap, center_coef)

    return loss_fn


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _pooled_hidden_jit(graphdef, state, ids, mask, pooling):
    return pool_hidden(nnx.merge(graphdef, state).hidden(ids, mask), mask, pooling)


def pooled_features(backbone, ids, mask, batch_size: int = 32, pooling: str = "last") -> jax.Array:
    """Final-normed hidden states pooled per row (``heads.pool_hidden``) -> float32 [N, D], in
    fixed chunks."""
    graphdef, state = nnx.split(backbone)
    fn = functools.partial(_pooled_hidden_jit, graphdef, state, pooling=pooling)
    return map_fixed_chunks(fn, (ids, mask), batch_size).astype(jnp.float32)


class RewardModelTrainer(HeadTrainer):
    """Trains a RewardModel on PairArrays; `evaluate` gives held-out pairwise accuracy.

    The loop, checkpoints and mesh placement are ``HeadTrainer``'s (see there for checkpointer and
    mesh).
    """

    def __init__(self, cfg: RewardTrainConfig, model, train: PairArrays, eval_data: PairArrays | None = None,
                 *, checkpointer=None, log: Callable[..., None] | None = None, mesh=None):
        cfg = self.check_common(cfg, mesh)
        if not hasattr(model, "score"):
            raise TypeError(f"RewardModelTrainer needs a RewardModel, got {type(model).__name__}")
        if train.size < 1:
            raise ValueError("no training pairs; sample more prompts or relax min_gap")
        self.train_data, self.eval_data = train, eval_data
        super().__init__(cfg, model, checkpointer=checkpointer, log=log, mesh=mesh)
        self.place_state()
        self._features: dict[int, tuple] = {}
        if self.on_features:  # frozen backbone: its pooled states never change
            self._features[id(train)] = self._pair_features(train)
            if eval_data is not None:
                self._features[id(eval_data)] = self._pair_features(eval_data)

    def loss_fn(self):
        return bt_loss(self.graphdef, self.finetune, self.cfg.center_coef, self.on_features)

    @property
    def train_size(self) -> int:
        return self.train_data.size

    def step_scalars(self) -> tuple:
        return jnp.float32(self.cfg.margin), jnp.float32(self.cfg.margin_from_gap)

    def eval_metrics(self) -> dict[str, float]:
        return {f"eval_{k}": v for k, v in self.evaluate().items()}

    def _pair_features(self, data: PairArrays):
        """Pooled states of chosen and rejected rows; each distinct row is run once (a response
        appears in several pairs when every pair of a prompt's responses is used)."""
        model = self.current_model()
        ids = np.concatenate([np.asarray(data.chosen_ids), np.asarray(data.rejected_ids)])
        mask = np.concatenate([np.asarray(data.chosen_mask), np.asarray(data.rejected_mask)])
        rows = np.where(mask, ids, -1)  # padding content never matters
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        feats = pooled_features(model.backbone, ids[first], mask[first], self.cfg.eval_batch_size,
                                model.pooling)
        feats = feats[jnp.asarray(inverse.reshape(-1))]
        n = data.size
        return feats[:n], feats[n:], jnp.asarray(data.gap)

    def batch(self, idx):
        if self.on_features:
            h_c, h_r, gap = self._features[id(self.train_data)]
            return h_c[idx], h_r[idx], gap[idx]
        return jax.tree.map(jnp.asarray, self.train_data.take(idx))

    # -- evaluation -----------------------------------------------------------------------------
    def pair_scores(self, data: PairArrays) -> tuple[np.ndarray, np.ndarray]:
        """(chosen scores [N], rejected scores [N]) under the current weights."""
        if self.on_features:
            feats = self._features.get(id(data)) or self._pair_features(data)
            head = jax.device_get(self.trainable)  # a few hundred numbers; the features may sit elsewhere
            return np.asarray(project(head, feats[0])), np.asarray(project(head, feats[1]))
        model, bs = self.current_model(), self.cfg.eval_batch_size
        return (score_arrays(model, np.asarray(data.chosen_ids), np.asarray(data.chosen_mask), bs),
                score_arrays(model, np.asarray(data.rejected_ids), np.asarray(data.rejected_mask), bs))

    def evaluate(self, data: PairArrays | None = None, scores=None) -> dict[str, float]:
        """Pairwise accuracy (ties half) and BT loss on `data` (default: the held-out pairs).

        scores: ``pair_scores(data)`` when the caller already has them (LoRA and full fine-tuning
        rerun the backbone over every row to get them).
        """
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("no evaluation pairs; pass eval_data to the trainer or data= here")
        rc, rr = self.pair_scores(data) if scores is None else scores
        loss, metrics = bt_scores_and_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(data.gap),
                                           self.cfg.margin, self.cfg.margin_from_gap, self.cfg.center_coef)
        return {"pairwise_accuracy": float(metrics["accuracy"]), "loss": float(loss), "pairs": data.size}
