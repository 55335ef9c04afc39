"""Check a checkpoint's tensor list against the config, then assemble streamed tensors into a model.

Checking uses names and shapes only (from file headers), so a wrong or incomplete checkpoint is
rejected before any weight is read. Assembly fills one preallocated host array per parameter (in
the parameter dtype) tensor by tensor, then hands them to an abstract model without ever running
random initialisation.
"""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from iapo_jax.errors import CheckpointError
from iapo_jax.models.config import ModelConfig
from iapo_jax.models.hf_weights import TensorRule, is_ignored, normalise_name, tensor_rules
from iapo_jax.models.transformer import Transformer


def check_tensor_list(
    config: ModelConfig, shapes: dict[str, tuple[int, ...]], file_of: dict[str, str], source: str
) -> dict[str, TensorRule]:
    """Validate HF names/shapes; return the rule for every stored name (None-free, ignored dropped)."""
    rules = tensor_rules(config)
    matched: dict[str, TensorRule] = {}
    for name, shape in shapes.items():
        if is_ignored(config, name):
            continue
        rule = rules.get(normalise_name(config, name))
        if rule is None:
            raise CheckpointError(
                f"{file_of[name]}: unexpected tensor {name!r} for a {config.hf_model_type or config.family} "
                "model with this config; the checkpoint and its config do not belong together.")
        if tuple(shape) != rule.hf_shape:
            raise CheckpointError(
                f"{file_of[name]}: tensor {name!r} has shape {tuple(shape)}, but the config implies "
                f"{rule.hf_shape}; the checkpoint and its config do not belong together.")
        matched[name] = rule
    found = {r.hf_name for r in matched.values()}
    missing = [n for n in rules if n not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{more}; the checkpoint is "
                              "incomplete (a shard missing?) or does not match its config.")
    return matched


class ParamAssembler:
    """Collects streamed tensors into full (layer-stacked) parameter arrays on the host."""

    def __init__(self, config: ModelConfig):
        self.config = config
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        self.shapes = {_key(path): var.shape for path, var in _variables(abstract)}
        self.dtype = jnp.dtype(config.param_dtype)
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, rule: TensorRule, hf_array: np.ndarray) -> None:
        for (path, layer), part in zip(rule.targets, rule.load(hf_array), strict=True):
            if path not in self.arrays:
                self.arrays[path] = np.empty(self.shapes[path], self.dtype)
            if layer is None:
                self.arrays[path][...] = part
            else:
                self.arrays[path][layer] = part

    def build(self) -> Transformer:
        return build_model(self.config, self.arrays)


def build_model(config: ModelConfig, arrays: dict[str, np.ndarray]) -> Transformer:
    """An NNX Transformer holding `arrays` (path -> array), without random initialisation.

    Arrays are popped from the dict as they are moved into the model, so host copies are released
    one parameter at a time.
    """
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    dtype = jnp.dtype(config.param_dtype)
    for path, var in _variables(model):
        var.set_value(jnp.asarray(arrays.pop(_key(path)), dtype))
    return model


def stream_into_model(config: ModelConfig, tensors: Iterable[tuple[TensorRule, np.ndarray]]) -> Transformer:
    assembler = ParamAssembler(config)
    for rule, array in tensors:
        assembler.put(rule, array)
    return assembler.build()


def model_arrays(model: Transformer) -> dict[str, np.ndarray]:
    """Parameter path ('layers.q', 'embed', ...) -> host array, for writers."""
    return {_key(path): np.asarray(var[...]) for path, var in _variables(model)}


def _variables(model) -> list[tuple[tuple, nnx.Variable]]:
    return [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]


def _key(path) -> str:
    return ".".join(str(p) for p in path)


__all__ = ["ParamAssembler", "build_model", "check_tensor_list", "model_arrays", "stream_into_model"]
