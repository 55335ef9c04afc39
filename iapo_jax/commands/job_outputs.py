"""Files the sampling jobs write into their run directory (process 0 only, each written atomically)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_FILE = "samples.jsonl"


def _is_main() -> bool:
    from iapo_jax.parallel.distributed import is_main_process

    return is_main_process()


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line (non-ASCII kept readable); nothing is written on other processes."""
    from iapo_jax.runtime.jsonable import to_jsonable

    path = Path(path)
    if _is_main():
        text = "".join(json.dumps(to_jsonable(dict(r)), ensure_ascii=False) + "\n" for r in rows)
        _atomic_text(path, text)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    if _is_main():
        _atomic_text(path, text)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def digest_number(sha256_hex: str) -> int:
    """The first 48 bits of a hex digest as an integer: exact in a float64 metric, so ``iapo
    reproduce`` can compare a fingerprint like any other number."""
    return int(sha256_hex[:12], 16)


def tie_fraction(scores: np.ndarray) -> float:
    """Mean over rows of the fraction of sample pairs in a row whose scores are equal: the chance
    that two reference samples of a prompt tie (where the mid-rank rule of calibration matters)."""
    scores = np.asarray(scores)
    m = scores.shape[1]
    if m < 2:
        return 0.0
    fractions = []
    for row in scores:
        _, counts = np.unique(row, return_counts=True)
        fractions.append(float(np.sum(counts * (counts - 1))) / (m * (m - 1)))
    return float(np.mean(fractions))
