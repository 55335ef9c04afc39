"""Saving, resuming and reloading trained head models (reward models and prefix scorers).

A training run keeps Orbax checkpoints (through ``iapo_jax.runtime.checkpointing``) of what it
trains only: the head, LoRA factors, or the full state (see ``models.finetune.Finetune``), plus the
optimizer state. Beside them it writes ``head_model.json`` naming the base model, the training
mode, the checkpoint folder and (for reward models) the pooling, so ``load_head_model(run_dir)``
can rebuild the trained model: load the base, attach a head, restore the trainable part onto it
and merge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from iapo_jax.errors import IapoError
from iapo_jax.models.heads import POOLINGS
from iapo_jax.models.finetune import Finetune, merged_state, split_for_training

SPEC_FILE = "head_model.json"
KINDS = ("reward", "value")


class HeadModelError(IapoError, ValueError):
    """A saved head model cannot be found or does not describe a model this library can rebuild."""


def abstract(tree: Any) -> Any:
    """Restore targets: shape, dtype and sharding of every array (Orbax restores onto them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def write_spec(run_dir: str | os.PathLike, *, kind: str, base: str, finetune: Finetune,
               checkpoint_dir: str = "checkpoints", **extra: Any) -> Path:
    """Write ``head_model.json`` (process 0 only; atomically)."""
    from iapo_jax.runtime.manifest import write_json_atomic

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    data = {"kind": kind, "base": str(base), "finetune": finetune.as_dict(),
            "checkpoint_dir": checkpoint_dir, **extra}
    return write_json_atomic(Path(run_dir) / SPEC_FILE, data)


def read_spec(path: str | os.PathLike) -> tuple[dict, Path]:
    """(spec, run directory) from a run directory or its head_model.json."""
    path = Path(path)
    spec_path = path if path.is_file() else path / SPEC_FILE
    if not spec_path.is_file():
        raise HeadModelError(f"{spec_path} not found: pass the run directory of an `iapo train-rm` or "
                             "`iapo train-scorer` run (it holds head_model.json)")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HeadModelError(f"{spec_path} is not valid JSON ({err}); rerun the training job") from None
    for key in ("kind", "base", "finetune"):
        if key not in spec:
            raise HeadModelError(f"{spec_path} lacks {key!r}; it was not written by a training job")
    if spec["kind"] not in KINDS:
        raise HeadModelError(f"{spec_path}: unknown kind {spec['kind']!r}; expected one of {KINDS}")
    if spec.get("pooling", "last") not in POOLINGS:
        raise HeadModelError(f"{spec_path}: unknown pooling {spec['pooling']!r}; expected one of "
                             f"{POOLINGS} (rerun the training job)")
    return spec, spec_path.parent


def save_training_state(ckpt, step: int, trainable, opt_state, finetune: Finetune, *,
                        metrics: dict | None = None, config: Any = None, force: bool = True) -> bool:
    """One checkpoint of (trainable, opt_state) with the training mode in its metadata."""
    save = ckpt.save if force else ckpt.maybe_save
    return save(step, model=trainable, opt_state=opt_state, config=config, metrics=metrics,
                extra={"finetune": finetune.as_dict()})


def restore_training_state(ckpt, trainable, opt_state, finetune: Finetune, step: int | None = None):
    """Restore onto the structure of (trainable, opt_state) -> (trainable, opt_state, step).

    opt_state may be None to restore the weights alone (for inference).
    """
    restored = ckpt.restore(model=abstract(trainable),
                            opt_state=None if opt_state is None else abstract(opt_state), step=step)
    saved = restored.meta.get("extra", {}).get("finetune")
    if saved is not None and Finetune(**saved) != finetune:
        raise HeadModelError(f"checkpoint step {restored.step} was trained with {saved}, not "
                             f"{finetune.as_dict()}; restore with the run's own settings")
    return restored.model, restored.opt_state, restored.step


def build_head_model(kind: str, base_model, seed: int = 0, pooling: str = "last"):
    """A RewardModel / ValueModel whose backbone starts as a copy of `base_model`.

    pooling: how a reward model reads a sequence (``heads.pool_hidden``); value models score
    every prefix and take none.
    """
    from flax import nnx

    from iapo_jax.models import RewardModel, ValueModel

    if kind == "reward":
        return RewardModel.from_policy(base_model, nnx.Rngs(seed), pooling=pooling)
    return ValueModel.from_policy(base_model, nnx.Rngs(seed))


def load_head_model(path: str | os.PathLike, kind: str | None = None, step: int | None = None,
                    dtype: str = "float32"):
    """(model, tokenizer, spec) of a trained reward model / prefix scorer from its run directory.

    step: a checkpoint step (default: the step the spec names, else the latest).
    """
    from flax import nnx

    from iapo_jax.models import load_model, load_tokenizer
    from iapo_jax.runtime.checkpointing import Checkpointer

    spec, run_dir = read_spec(path)
    if kind is not None and spec["kind"] != kind:
        raise HeadModelError(f"{run_dir} holds a {spec['kind']} model, not a {kind} model")
    finetune = Finetune(**spec["finetune"]).validate()
    base = load_model(spec["base"], dtype=dtype)
    # Runs saved before pooling was recorded read the last token.
    model = build_head_model(spec["kind"], base, pooling=spec.get("pooling", "last"))
    graphdef, frozen, trainable = split_for_training(model, finetune, jax.random.key(0))
    ckpt_dir = run_dir / spec.get("checkpoint_dir", "checkpoints")
    with Checkpointer(ckpt_dir, handle_sigterm=False) as ckpt:
        if step is None:
            step = spec.get("step")
        trainable, _, _ = restore_training_state(ckpt, trainable, None, finetune, step)
    model = nnx.merge(graphdef, merged_state(frozen, trainable, finetune))
    return model, load_tokenizer(spec["base"], model=model), spec
