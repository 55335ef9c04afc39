"""Training a scalar-head model (a RewardModel or ValueModel) on a fixed data set.

Bradley-Terry reward models and CD-FUDGE / CD-Q prefix scorers share everything but their loss and
their batches: the training mode (``models.finetune``), the optimizer, seeded epochs that a resume
replays, the loop with held-out evaluation, logging and checkpoints every few steps, and the
checkpoint format (``rewards.head_checkpoints``). Subclasses define ``loss_fn`` (pure, as
``trainer.make_update_step`` takes it), ``batch``, ``train_size`` and ``eval_metrics``; this class
does the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx

from iapo_jax.alignment.optimizer import OptimizerConfig, make_optimizer
from iapo_jax.alignment.trainer import Hook, LossFn, Trainer, make_update_step
from iapo_jax.models.finetune import Finetune, merged_state, split_for_training
from iapo_jax.parallel.sharded_step import check_batch_divides
from iapo_jax.rewards.head_checkpoints import restore_training_state, save_training_state


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
    """Settings every head-model trainer takes (subclassed with each loss's own)."""

    steps: int = 100
    batch_size: int = 16
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
        """Warmup from 0, then a cosine decay to a tenth of the peak over ``steps``."""
        return OptimizerConfig(self.learning_rate, self.warmup_steps, self.weight_decay, self.max_grad_norm)

    def validate(self):
        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (got {self.save_every}); 0 saves at the end only")
        self.finetune.validate()
        self.optimizer.validate()
        return self


def epoch_batches(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: epochs are seeded permutations, so resuming replays them."""
    per_epoch = max(n // batch_size, 1)
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:  # tiny data: wrap around inside the batch
        perm = np.resize(perm, batch_size)
    return perm[within * batch_size:(within + 1) * batch_size]


class HeadTrainer(Trainer):
    """The shared part of RewardModelTrainer and PrefixScorerTrainer.

    The model passed in is left untouched; ``current_model()`` returns the trained one.
    checkpointer: an ``iapo_jax.runtime.checkpointing.Checkpointer`` (saves every ``save_every``
    steps and at the end of ``train``); ``restore()`` resumes from it.
    mesh: a ('data', 'fsdp', 'tensor') mesh to train on: weights and optimizer state sharded by
    their logical names, each batch split over data x fsdp (batch_size must divide).
    """

    def __init__(self, cfg: HeadTrainConfig, model, *, checkpointer=None,
                 log: Callable[..., None] | None = None, mesh=None):
        """Subclasses check their data first (errors before any compute), then call this."""
        self.cfg = cfg
        self.mesh = mesh
        self.finetune = cfg.finetune
        self.on_features = self.finetune.mode == "head"  # frozen backbone: features computed once
        self.ckpt, self.log = checkpointer, log
        self.graphdef, self.frozen, self.trainable = split_for_training(
            model, self.finetune, jax.random.key(cfg.seed))
        self.optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        self.opt_state = self.optimizer.init(self.trainable)
        self._step_fn = make_update_step(self.loss_fn(), self.optimizer, mesh)
        self.step = 0
        self._saved_step = -1

    @staticmethod
    def check_common(cfg: HeadTrainConfig, mesh) -> HeadTrainConfig:
        """The settings' and the mesh's errors, raised before any compute."""
        cfg = cfg.validate()
        if mesh is not None:
            check_batch_divides(cfg.batch_size, mesh, "batch_size")
        return cfg

    # -- what a subclass defines ------------------------------------------------------------------
    def loss_fn(self) -> LossFn:
        raise NotImplementedError

    def batch(self, idx: np.ndarray):
        """The training batch of rows ``idx``, as the loss takes it."""
        raise NotImplementedError

    def step_scalars(self) -> tuple:
        """Traced scalars passed to the loss after the batch."""
        return ()

    @property
    def train_size(self) -> int:
        raise NotImplementedError

    def eval_metrics(self) -> dict[str, float]:
        """What the held-out evaluation logs during training."""
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------------
    def current_model(self):
        """The model with the trained weights merged in (an NNX module)."""
        return nnx.merge(self.graphdef, merged_state(self.frozen, self.trainable, self.finetune))

    # -- training ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        idx = epoch_batches(self.train_size, self.cfg.batch_size, self.step, self.cfg.seed)
        self.trainable, self.opt_state, m = self._step_fn(
            self.trainable, self.frozen, self.opt_state, self.batch(idx), *self.step_scalars())
        self.step += 1
        return {k: float(v) for k, v in m.items()}

    def train(self, steps: int | None = None, eval_every: int = 0, progress=None) -> list[dict]:
        """Run up to `steps` (default cfg.steps) steps; evaluates every `eval_every` steps and at the
        last; checkpoints every ``save_every`` steps, stopping when the checkpointer says so, and
        at the end."""
        steps = self.cfg.steps if steps is None else steps
        hooks = []
        if eval_every and self.eval_data is not None:
            hooks.append(Hook(lambda step, metrics: metrics.update(self.eval_metrics()), every=eval_every))
        if self.log:
            hooks.append(Hook(lambda step, metrics: self.log(step, **metrics)))
        if self.ckpt is not None and self.cfg.save_every:
            hooks.append(Hook(self._checkpoint, every=self.cfg.save_every, at_last=False))
        history = self.fit(steps, hooks, progress)
        if self.ckpt is not None:
            self.save()
        return history

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, step: int, metrics: dict) -> bool:
        """Save this step; True (stop) when the checkpointer asks to stop (preemption)."""
        self.save()
        return self.ckpt.should_stop

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
        self.place_state()
        return self.step
