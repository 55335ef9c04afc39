"""One trainer skeleton: the compiled update step, the fit loop with its hooks, and the train
state's placement on a mesh.

CTRL, Bradley-Terry reward models and prefix scorers all train a pair (frozen, trainable) of
pytrees with an optax optimizer. A step is the gradient of the trainer's loss, one optimizer update
and the gradient norm, compiled once (sharded under a mesh). The trainers keep only their loss and
how they build a batch; the loop and what runs between steps (evaluation, probes, logging,
checkpoints, preemption) are hooks, in the spirit of levanter's trainer hooks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import optax

from iapo_jax.parallel.sharded_step import compile_train_step, shard_train_state

# loss_fn(trainable, frozen, batch, *scalars) -> (loss, metrics); scalars are traced values.
LossFn = Callable[..., tuple[jax.Array, dict]]


def make_update_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh=None) -> Callable:
    """step(trainable, frozen, opt_state, batch, *scalars) -> (trainable, opt_state, metrics).

    The step differentiates ``loss_fn`` in ``trainable`` only, applies one optimizer update and adds
    ``grad_norm`` to the loss's metrics. It is jitted with the trainable and optimizer state
    donated; under ``mesh`` it runs sharded (place the state first with ``Trainer.place_state``).
    """

    def step(trainable, frozen, opt_state, batch, *scalars):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, *scalars)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return compile_train_step(step, mesh)


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(step, metrics)`` after every ``every``-th step, and after the loop's last step with
    ``at_last``. fn may add entries to ``metrics``; a true return value stops the loop there."""

    fn: Callable[[int, dict], Any]
    every: int = 1
    at_last: bool = True

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or (self.at_last and step == last))


class Trainer:
    """What every trainer shares: ``trainable``, ``frozen`` and ``opt_state`` trees, the ``step``
    counter, an optional ('data', 'fsdp', 'tensor') ``mesh``, and the fit loop.

    Subclasses set those attributes and define ``train_step() -> metrics``, which advances
    ``step``.
    """

    mesh = None
    step: int = 0

    def place_state(self) -> None:
        """Shard the training state over the mesh (a no-op without one): weights and optimizer state
        by their logical names. Also after a restore, whatever mesh the checkpoint was saved from."""
        if self.mesh is not None:
            self.trainable, self.frozen, self.opt_state = shard_train_state(
                self.trainable, self.frozen, self.opt_state, self.mesh)

    def train_step(self) -> dict:
        raise NotImplementedError

    def step_metrics(self) -> dict:
        """One step's metrics for the loop (``train_step``'s own result unless it returns more)."""
        return self.train_step()

    def fit(self, steps: int, hooks: Sequence[Hook] = (), progress: Callable | None = None) -> list[dict]:
        """Train from ``step`` up to ``steps``, running the due hooks in order after each step.

        progress: wraps the step range (a progress bar). Returns every step's metrics.
        """
        history: list[dict] = []
        steps_left = range(self.step, steps)
        for _ in (progress(steps_left) if progress else steps_left):
            metrics = self.step_metrics()
            stop = False
            for hook in hooks:
                if hook.due(self.step, steps):
                    stop = bool(hook.fn(self.step, metrics)) or stop
            history.append(metrics)
            if stop:
                break
        return history
