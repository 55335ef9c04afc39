"""Bradley-Terry reward-model training: a jit-compiled pure step, a trainer, held-out accuracy.

Pairs (``rewards.preference_pairs``) are tokenised like the reward adapter tokenises at scoring
time (``rewards.reward_model.sequence_ids``), so a model trained here scores served responses the
same way. One step scores chosen and rejected rows in a single forward pass and minimises

    -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m) [+ center_coef * mean((r_c + r_r)^2)]

with m = margin + margin_from_gap * (the ranking scorer's gap) (``alignment.losses``), using AdamW
on a warmup-cosine schedule. In mode 'head' (``rewards.trainable``) the backbone is frozen, so the
pooled hidden states (``heads.pool_hidden``) are computed once and each step trains the head on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from iapo_jax.alignment import losses
from iapo_jax.models.heads import pool_hidden
from iapo_jax.parallel.sharded_step import (
    check_batch_divides,
    compile_train_step,
    shard_train_state,
)
from iapo_jax.rewards.head_checkpoints import (
    restore_training_state,
    save_training_state,
)
from iapo_jax.rewards.preference_pairs import Preference
from iapo_jax.rewards.reward_model import score_arrays, sequence_ids, width_for
from iapo_jax.rewards.trainable import (
    Finetune,
    OptimizerConfig,
    make_optimizer,
    merged_state,
    project,
    split_for_training,
)


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
class RewardTrainConfig:
    """Bradley-Terry training settings (see the module docstring for the loss)."""

    steps: int = 100
    batch_size: int = 16
    margin: float = 0.0
    margin_from_gap: float = 0.0
    center_coef: float = 0.0
    mode: str = "lora"  # 'full' | 'lora' | 'head'
    lora_rank: int = 8
    lora_alpha: float = 16.0
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 32
    save_every: int = 0  # 0: only the final checkpoint
    seed: int = 0

    @property
    def finetune(self) -> Finetune:
        return Finetune(self.mode, self.lora_rank, self.lora_alpha)

    @property
    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(self.learning_rate, self.warmup_steps, self.weight_decay, self.max_grad_norm)

    def validate(self) -> "RewardTrainConfig":
        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.center_coef < 0:
            raise ValueError(f"center_coef must be >= 0 (got {self.center_coef})")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (got {self.save_every}); 0 saves at the end only")
        self.finetune.validate()
        self.optimizer.validate()
        return self


def bt_scores_and_loss(chosen, rejected, gap, margin, margin_from_gap, center_coef: float):
    """Bradley-Terry loss and metrics from scores; the margin is traced, the centering static."""
    m = margin + margin_from_gap * gap
    loss = losses.bradley_terry_loss(chosen, rejected, m, center_coef)
    metrics = {"loss": loss, "accuracy": losses.pairwise_accuracy(chosen, rejected),
               "reward_gap": jnp.mean(chosen - rejected), "reward_mean": jnp.mean(chosen + rejected) / 2}
    return loss, metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, finetune: Finetune,
                    center_coef: float = 0.0, on_features: bool = False, mesh=None) -> Callable:
    """step(trainable, frozen, opt_state, batch, margin, margin_from_gap) -> (trainable, opt_state, metrics).

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

    def step(trainable, frozen, opt_state, batch, margin, margin_from_gap):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, margin, margin_from_gap)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return trainable, opt_state, metrics

    return compile_train_step(step, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _pooled_hidden_jit(graphdef, state, ids, mask, pooling):
    return pool_hidden(nnx.merge(graphdef, state).hidden(ids, mask), mask, pooling)


def pooled_features(backbone, ids, mask, batch_size: int = 32, pooling: str = "last") -> jax.Array:
    """Final-normed hidden states pooled per row (``heads.pool_hidden``) -> float32 [N, D], in
    fixed chunks."""
    graphdef, state = nnx.split(backbone)
    ids, mask = np.asarray(ids), np.asarray(mask)
    out = []
    for start in range(0, ids.shape[0], batch_size):
        i, m = ids[start:start + batch_size], mask[start:start + batch_size]
        real = i.shape[0]
        if real < batch_size:
            i = np.concatenate([i, np.repeat(i[:1], batch_size - real, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch_size - real, 0)])
        out.append(_pooled_hidden_jit(graphdef, state, jnp.asarray(i), jnp.asarray(m), pooling)[:real])
    return jnp.concatenate(out).astype(jnp.float32)


def epoch_batches(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: epochs are seeded permutations, so resuming replays them."""
    per_epoch = max(n // batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:  # tiny data: wrap around inside the batch
        perm = np.resize(perm, batch_size)
    return perm[within * batch_size:(within + 1) * batch_size]


class RewardModelTrainer:
    """Trains a RewardModel on PairArrays; `evaluate` gives held-out pairwise accuracy.

    The model passed in is left untouched; `current_model()` returns the trained one.
    checkpointer: an ``iapo_jax.runtime.checkpointing.Checkpointer`` (saves every ``save_every``
    steps and at the end of ``train``); ``restore()`` resumes from it.
    mesh: a ('data', 'fsdp', 'tensor') mesh to train on: weights and optimizer state sharded by
    their logical names, each batch split over data x fsdp (batch_size must divide).
    """

    def __init__(self, cfg: RewardTrainConfig, model, train: PairArrays, eval_data: PairArrays | None = None,
                 *, checkpointer=None, log: Callable[..., None] | None = None, mesh=None):
        self.cfg = cfg.validate()
        if mesh is not None:  # before any compute
            check_batch_divides(cfg.batch_size, mesh, "batch_size")
        self.mesh = mesh
        if not hasattr(model, "score"):
            raise TypeError(f"RewardModelTrainer needs a RewardModel, got {type(model).__name__}")
        if train.size < 1:
            raise ValueError("no training pairs; sample more prompts or relax min_gap")
        self.finetune = cfg.finetune
        self.train_data, self.eval_data = train, eval_data
        self.ckpt, self.log = checkpointer, log
        self.graphdef, self.frozen, self.trainable = split_for_training(
            model, self.finetune, jax.random.key(cfg.seed))
        self.optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        self.opt_state = self.optimizer.init(self.trainable)
        self.on_features = self.finetune.mode == "head"
        self._step_fn = make_train_step(self.graphdef, self.optimizer, self.finetune, cfg.center_coef,
                                        self.on_features, mesh)
        self._place()
        self._features: dict[int, tuple] = {}
        self._saved_step = -1
        if self.on_features:  # frozen backbone: its pooled states never change
            self._features[id(train)] = self._pair_features(train)
            if eval_data is not None:
                self._features[id(eval_data)] = self._pair_features(eval_data)
        self.step = 0

    # -- state ----------------------------------------------------------------------------------
    def _place(self) -> None:
        """Shard the training state over the mesh (a no-op without one)."""
        if self.mesh is not None:
            self.trainable, self.frozen, self.opt_state = shard_train_state(
                self.trainable, self.frozen, self.opt_state, self.mesh)

    def current_model(self):
        """The reward model with the trained weights merged in (an NNX module)."""
        return nnx.merge(self.graphdef, merged_state(self.frozen, self.trainable, self.finetune))

    def _pair_features(self, data: PairArrays):
        """Pooled states of chosen and rejected rows; each distinct row is run once (a response
        appears in several pairs when every pair of a prompt's responses is used)."""
        model = nnx.merge(self.graphdef, merged_state(self.frozen, self.trainable, self.finetune))
        ids = np.concatenate([np.asarray(data.chosen_ids), np.asarray(data.rejected_ids)])
        mask = np.concatenate([np.asarray(data.chosen_mask), np.asarray(data.rejected_mask)])
        rows = np.where(mask, ids, -1)  # padding content never matters
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        feats = pooled_features(model.backbone, ids[first], mask[first], self.cfg.eval_batch_size,
                                model.pooling)
        feats = feats[jnp.asarray(inverse.reshape(-1))]
        n = data.size
        return feats[:n], feats[n:], jnp.asarray(data.gap)

    def _batch(self, idx):
        if self.on_features:
            h_c, h_r, gap = self._features[id(self.train_data)]
            return h_c[idx], h_r[idx], gap[idx]
        return jax.tree.map(jnp.asarray, self.train_data.take(idx))

    # -- training -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        idx = epoch_batches(self.train_data.size, self.cfg.batch_size, self.step, self.cfg.seed)
        self.trainable, self.opt_state, m = self._step_fn(
            self.trainable, self.frozen, self.opt_state, self._batch(idx),
            jnp.float32(self.cfg.margin), jnp.float32(self.cfg.margin_from_gap))
        self.step += 1
        return {k: float(v) for k, v in m.items()}

    def train(self, steps: int | None = None, eval_every: int = 0, progress=None) -> list[dict]:
        """Run up to `steps` (default cfg.steps) steps; evaluates every `eval_every` steps."""
        steps = self.cfg.steps if steps is None else steps
        history = []
        it = range(self.step, steps)
        for _ in (progress(it) if progress else it):
            metrics = self.train_step()
            if eval_every and self.eval_data is not None and (self.step % eval_every == 0 or self.step == steps):
                metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            history.append(metrics)
            if self.log:
                self.log(self.step, **metrics)
            if self.ckpt is not None and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self.save()
                if self.ckpt.should_stop:
                    break
        if self.ckpt is not None:
            self.save()
        return history

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

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> bool:
        """Checkpoint the current step (once per step)."""
        if self.ckpt is None:
            raise ValueError("no checkpointer was given to the trainer")
        if self._saved_step == self.step or self.ckpt.latest_step() == self.step:
            return False
        self._saved_step = self.step
        return save_training_state(self.ckpt, self.step, self.trainable, self.opt_state, self.finetune,
                                   config=self.cfg)

    def restore(self, step: int | None = None) -> int:
        """Resume from the checkpointer (latest step by default); returns the restored step."""
        if self.ckpt is None:
            raise ValueError("no checkpointer was given to the trainer")
        self.trainable, self.opt_state, self.step = restore_training_state(
            self.ckpt, self.trainable, self.opt_state, self.finetune, step)
        self._place()  # whatever mesh the checkpoint was saved from, train on this one
        return self.step
