"""Read an HF checkpoint directory: config.json plus one or several safetensors files.

Only safetensors is read (a `pytorch_model.bin` would need unpickling, which this library never does).
Headers of every file are opened first, so a truncated or missing shard is reported before any
weight is read; tensors are then streamed one at a time through `safe_open`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from iapo_jax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; an HF checkpoint directory needs config.json next "
                              "to its safetensors files (save one with save_pretrained or save_hf).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}).") from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}).") from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX_FILE} but missing; download it again.")
        return shards
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (f" Found {others}: pickled PyTorch weights are never loaded; convert them to safetensors."
            if others else "")
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}.{hint}")


def tensor_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Name -> shape and name -> file for every tensor, from the headers alone."""
    shapes, file_of = {}, {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name in shapes:
                    raise CheckpointError(f"{path}: tensor {name!r} also appears in {file_of[name]}.")
                shapes[name] = tuple(f.get_slice(name).get_shape())
                file_of[name] = str(path)
    return shapes, file_of


def stream_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except (SafetensorError, OSError, TypeError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}).") from None


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it is probably truncated or damaged, "
            "download or save it again.") from None
