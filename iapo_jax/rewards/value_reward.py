"""A trained prefix scorer (value model) used as a reward on complete responses.

A CD-FUDGE / CD-Q scorer predicts the final reward from any prefix; read at the end of a complete
response, V([x, y]) is its estimate of the reward itself. Responses are laid out as a reward model
lays them out (chat-templated prompt, response tokens, end-of-turn token: see reward_model), left
padded to a few widths and scored in fixed-size chunks, so one compiled program serves every call.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iapo_jax.rewards.base import check_scores
from iapo_jax.rewards.reward_model import _check_pairs, encode_pairs_text
from iapo_jax.runtime.fixed_chunks import map_fixed_chunks


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _final_values(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return model.values(ids, mask, positions)[:, -1]  # left padded: the last column is the end


class ValueModelReward:
    """``score(prompts, responses)``: a ValueModel's value of each complete (prompt, response)."""

    def __init__(self, model, tokenizer, *, name: str = "prefix_scorer", max_length: int = 512,
                 batch_size: int = 32):
        if not hasattr(model, "values") or not isinstance(model, nnx.Module):
            raise TypeError(f"ValueModelReward needs a ValueModel, got {type(model).__name__}")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def from_run(cls, path: str | os.PathLike, step: int | None = None, **kwargs) -> "ValueModelReward":
        """The prefix scorer an ``iapo train-scorer`` run saved in ``path``."""
        from iapo_jax.rewards.head_checkpoints import load_head_model

        model, tokenizer, _ = load_head_model(path, kind="value", step=step)
        kwargs.setdefault("name", f"prefix_scorer:{os.fspath(path)}")
        return cls(model, tokenizer, **kwargs)

    def score(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        n = _check_pairs(prompts, responses, self.name)
        if n == 0:
            return np.zeros((0,), np.float32)
        ids, mask, _ = encode_pairs_text(self.tokenizer, prompts, responses, self.max_length)
        graphdef, state = nnx.split(self.model)
        values = map_fixed_chunks(functools.partial(_final_values, graphdef, state), (ids, mask), self.batch_size)
        return check_scores(np.asarray(values, np.float32), n, self.name)
