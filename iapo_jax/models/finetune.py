"""Which weights a reward model or prefix scorer trains, and its training state as (frozen, trainable).

Both trainers (Bradley-Terry reward models, CD-FUDGE / CD-Q prefix scorers) train a scalar head on
the shared backbone (`iapo_jax.models.heads`) in one of three modes:

- "full": every weight;
- "lora": the head plus LoRA factors on the attention/MLP kernels (the backbone stays frozen);
- "head": the head alone on a frozen backbone. The backbone's hidden states then never change, so
  trainers compute them once and each step costs a [rows, hidden] matmul: the mode that makes
  SmolLM2-sized models trainable in minutes on a CPU.

Training state is a pair (frozen, trainable) of pytrees; `merged_state` rebuilds the model's full
nnx.State inside the jitted step, so only `trainable` gets gradients and optimizer moments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from iapo_jax.models import lora

MODES = ("full", "lora", "head")
HEAD_KEYS = ("head", "head_bias")  # the scalar head's parameters in heads._ScalarHeadModel


@dataclasses.dataclass(frozen=True)
class Finetune:
    """What trains: mode 'full' | 'lora' | 'head', and the LoRA rank/alpha for 'lora'."""

    mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def validate(self) -> "Finetune":
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "lora" and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 in mode 'lora' (got {self.lora_rank}); "
                             "or use mode 'full' / 'head'")
        if self.mode == "lora" and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive (got {self.lora_alpha})")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def head_of(state: nnx.State) -> dict[str, jax.Array]:
    """{'head': [D], 'head_bias': []} read from a head model's state."""
    flat = {_name(p): v[...] for p, v in nnx.to_flat_state(state)}
    missing = [k for k in HEAD_KEYS if k not in flat]
    if missing:
        raise TypeError(f"the model has no scalar head ({missing} missing); pass a RewardModel or "
                        "ValueModel from iapo_jax.models")
    return {k: flat[k] for k in HEAD_KEYS}


def split_for_training(model: nnx.Module, spec: Finetune, key: jax.Array):
    """-> (graphdef, frozen, trainable) for a RewardModel / ValueModel under `spec`.

    frozen is None in mode 'full'; trainable is the whole state there, {'head', 'head_bias'} in
    mode 'head', and those plus {'lora': LoRA factors} in mode 'lora' (factors start at zero
    effect, so training starts from exactly the given model).
    """
    spec.validate()
    graphdef, state = nnx.split(model)
    # Copies: train steps donate the trainable buffers, which must not be the model's own.
    head = jax.tree.map(jnp.copy, head_of(state))
    if spec.mode == "full":
        return graphdef, None, jax.tree.map(jnp.copy, state)
    trainable: dict[str, Any] = dict(head)
    if spec.mode == "lora":
        trainable["lora"] = lora.init_lora(state, spec.lora_rank, key)
    return graphdef, state, trainable


def merged_state(frozen, trainable, spec: Finetune, factored: bool = False) -> nnx.State:
    """The model's full state from (frozen, trainable); pure, usable inside jit.

    factored: LoRA factors stay beside the frozen kernels (models.low_rank), for losses, whose
    backward then skips the frozen kernels' gradients; otherwise they are merged in.
    """
    if spec.mode == "full":
        return trainable
    state = frozen
    if spec.mode == "lora":
        attach = lora.attach_lora if factored else lora.merge_lora
        state = attach(state, trainable["lora"], spec.lora_alpha, spec.lora_rank)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = _name(path)
        if name in HEAD_KEYS:
            var = var.replace(trainable[name].astype(var[...].dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def trainable_head(trainable, spec: Finetune) -> dict[str, jax.Array]:
    return head_of(trainable) if spec.mode == "full" else {k: trainable[k] for k in HEAD_KEYS}


def project(head: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> float32 scores [...], the scalar head's formula (heads.py)."""
    w = head["head"].astype(jnp.float32)
    return h.astype(jnp.float32) @ w + head["head_bias"].astype(jnp.float32)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
