"""`Sampler`: a model with its tokenizer, optional reference model, mesh and default settings, and
one method per decoding mode.

A facade over the modes, so it sits above them: the modes import the compiled core
(`decoding.engine`), never this module.
"""

from __future__ import annotations

from iapo_jax.decoding.best_of_n import best_of_n
from iapo_jax.decoding.blockwise import blockwise_cd
from iapo_jax.decoding.engine import SampleOutput, sample
from iapo_jax.decoding.token_cd import token_cd


class Sampler:
    """A model with its tokenizer, optional reference model, mesh and default settings."""

    def __init__(self, model, tokenizer=None, *, ref_model=None, mesh=None, data_axis: str = "data",
                 **defaults):
        self.model, self.tokenizer, self.ref_model = model, tokenizer, ref_model
        self.mesh, self.data_axis = mesh, data_axis
        self.defaults = defaults

    def _kw(self, kwargs):
        return {"tokenizer": self.tokenizer, "mesh": self.mesh, "data_axis": self.data_axis,
                **self.defaults, **kwargs}

    def sample(self, prompts, **kwargs) -> SampleOutput:
        kwargs.setdefault("ref_model", self.ref_model)
        return sample(self.model, prompts, **self._kw(kwargs))

    def best_of_n(self, prompts, reward, **kwargs):
        return best_of_n(self.model, prompts, reward, **self._kw(kwargs))

    def blockwise(self, prompts, scorers, **kwargs):
        return blockwise_cd(self.model, prompts, scorers, **self._kw(kwargs))

    def token_cd(self, prompts, scorers, **kwargs):
        return token_cd(self.model, prompts, scorers, **self._kw(kwargs))
