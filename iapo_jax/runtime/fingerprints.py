"""Content hashes of what a run read and wrote, for the run record and ``iapo reproduce``.

Names in a config (a model path, a reward name) say where things came from, not what they were:
a model folder whose weights were replaced still has the same name. These hashes are of the bytes,
read in blocks so a multi-gigabyte checkpoint never sits in memory at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from iapo_jax.runtime.manifest import file_fingerprint

# Files orbax writes while a save is in flight; they are not part of any finished checkpoint.
_TMP_MARKER = ".orbax-checkpoint-tmp"


@functools.lru_cache(maxsize=64)
def _cached_file_hash(path: str, size: int, mtime_ns: int) -> str:
    return file_fingerprint(path)


def tree_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted), streamed.

    Unchanged files are hashed once per process (keyed on path, size and modification time).
    """
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return _cached_file_hash(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: it does not exist")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and _TMP_MARKER not in str(p)):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(tree_fingerprint(file).encode())
    return digest.hexdigest()


def _trained_head_files(path: Path) -> list[Path]:
    """What loading a trained reward model or prefix scorer reads from its run directory."""
    wanted = [path / "head_model.json", path / "checkpoints"]
    return [p for p in wanted if p.exists()] or [path]


def reward_fingerprint(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A reward (or scorer) by name and options, plus the contents of any folder or file an
    option points to (a trained reward model's run directory)."""
    options = dict(options or {})
    digest = hashlib.sha256(json.dumps({"name": name, "options": options}, sort_keys=True,
                                       default=str).encode())
    files = {}
    for key, value in sorted(options.items()):
        if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).exists():
            files[key] = path_fingerprint(value)
            digest.update(f"{key}={files[key]}".encode())
    return {"sha256": digest.hexdigest(), "reward": name, "options": options, "files": files}


def path_fingerprint(path: str | os.PathLike) -> str:
    """A trained head's run directory by the files that define it; anything else as a tree."""
    path = Path(path)
    if path.is_dir() and (path / "head_model.json").is_file():
        digest = hashlib.sha256()
        for part in _trained_head_files(path):
            digest.update(part.name.encode() + b"\0" + tree_fingerprint(part).encode())
        return digest.hexdigest()
    return tree_fingerprint(path)
