"""Calibrated rewards: the mid-rank quantile of a score among reference-policy scores.

    C_hat(x, y) = (1/m) * sum_j [ 1{r(x,y) > r(x,z_j)} + 1/2 * 1{r(x,y) = r(x,z_j)} ]

(algorithms.md section 2). With the pool sorted, the count of pool scores strictly below s is
``searchsorted(pool, s, 'left')`` and the count at or below s is ``searchsorted(pool, s, 'right')``,
so C_hat = (left + right) / (2m): ties count one half, which matters because lexicon rewards are
exactly 0 on most short chat lines. The functions here are pure jnp and jit-compatible;
``check_pool`` validates inputs eagerly, outside jit, because traced code cannot raise on NaN.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from iapo_jax.data.fingerprint import fingerprint


def check_pool(pool_scores, scores=None) -> None:
    """Raises ValueError if a reference pool (and optionally the scores to calibrate) is unusable.

    pool_scores: [P, m] with m >= 2 finite scores per prompt; scores: [P, n], finite, same P.
    """
    pool = np.asarray(pool_scores)
    if pool.ndim != 2:
        raise ValueError(
            f"pool_scores must have shape [P, m] (prompts x reference samples), got shape "
            f"{pool.shape}; for a single prompt use pool[None, :]"
        )
    if pool.shape[0] < 1:
        raise ValueError("pool_scores has no prompts (P = 0); build the pool from at least one prompt")
    if pool.shape[1] < 2:
        raise ValueError(
            f"reference pool has {pool.shape[1]} sample(s) per prompt; calibration needs at least 2 "
            "(its resolution is 1/m; around 100 is typical): sample more reference responses"
        )
    _check_finite(pool, "pool_scores")
    if scores is None:
        return
    s = np.asarray(scores)
    if s.ndim != 2 or s.shape[0] != pool.shape[0]:
        raise ValueError(
            f"scores must have shape [P, n] with the pool's P = {pool.shape[0]} prompts, got shape "
            f"{s.shape}; row p of scores is calibrated against row p of the pool"
        )
    _check_finite(s, "scores")


def _check_finite(arr: np.ndarray, what: str) -> None:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what} must be real numbers, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what} contains {int(bad.sum())} NaN/inf value(s) (first at index {where}); "
            "drop or rescore those samples before calibrating"
        )


def _mid_rank_row(pool_sorted_row, scores_row):
    below = jnp.searchsorted(pool_sorted_row, scores_row, side="left")
    at_or_below = jnp.searchsorted(pool_sorted_row, scores_row, side="right")
    return (below + at_or_below).astype(jnp.float32) / (2.0 * pool_sorted_row.shape[0])


def calibrate_sorted(scores, pool_sorted):
    """Mid-rank quantiles of ``scores`` [P, n] in ``pool_sorted`` [P, m] (rows ascending) -> [P, n].

    The caller guarantees sorted rows (``ReferencePool`` stores them so); use ``calibrate`` if unsure.
    """
    return jax.vmap(_mid_rank_row)(jnp.asarray(pool_sorted), jnp.asarray(scores))


def calibrate(scores, pool_scores):
    """Mid-rank quantile of each score in its prompt's reference pool, float32 in [0, 1].

    scores: [P, n] rewards of n responses to each of P prompts; pool_scores: [P, m] rewards of m
    reference-policy responses to the same prompts, in any order (sorted here). Pure and
    jit-compatible; validate eagerly with ``check_pool(pool_scores, scores)``. In training loops
    keep pools sorted once on the host (``ReferencePool``) and call ``calibrate_sorted``: XLA:CPU
    sorts slowly (measured 0.4 s for [1024, 1024] against 22 ms for the search itself).
    """
    return calibrate_sorted(scores, jnp.sort(jnp.asarray(pool_scores), axis=-1))


_POOL_FORMAT = 1
_POOL_JSON = "pool.json"
_POOL_NPZ = "scores.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class ReferencePool:
    """Reference samples for calibration: m responses per prompt from pi_ref, scored once.

    prompts: P distinct prompts; responses: P rows of m responses, or None when only scores are
    kept; scores: float32 [P, m], each row ascending, with ``responses`` in the same order; meta:
    JSON-serialisable provenance (reward name, model, sampling settings, seed). Build with
    ``ReferencePool.build``, which sorts and validates.
    """

    prompts: tuple[str, ...]
    responses: tuple[tuple[str, ...], ...] | None
    scores: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, prompts, scores, responses=None, meta=None) -> "ReferencePool":
        """Validates, sorts each prompt's samples by score and returns the pool."""
        scores = np.asarray(scores)
        check_pool(scores)
        prompts = tuple(prompts)
        if len(prompts) != scores.shape[0]:
            raise ValueError(
                f"ReferencePool: {len(prompts)} prompts but scores for {scores.shape[0]}; "
                "pass one row of scores per prompt"
            )
        order = np.argsort(scores, axis=-1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, axis=-1).astype(np.float32)
        sorted_responses = None
        if responses is not None:
            responses = [list(row) for row in responses]
            if len(responses) != len(prompts) or any(len(r) != scores.shape[1] for r in responses):
                raise ValueError(
                    f"ReferencePool: responses must be {len(prompts)} rows of {scores.shape[1]} "
                    "strings, matching scores [P, m]"
                )
            sorted_responses = tuple(
                tuple(row[j] for j in idx) for row, idx in zip(responses, order.tolist())
            )
        return cls(prompts, sorted_responses, sorted_scores, dict(meta or {}))

    def __post_init__(self):
        object.__setattr__(self, "scores", np.array(self.scores))  # own copy, made read-only below
        check_pool(self.scores)
        if self.scores.dtype != np.float32:
            raise ValueError("ReferencePool.scores must be float32; build pools with ReferencePool.build")
        if np.any(np.diff(self.scores, axis=-1) < 0):
            raise ValueError("ReferencePool.scores rows must be ascending; build pools with ReferencePool.build")
        if len(self.prompts) != self.scores.shape[0]:
            raise ValueError(f"ReferencePool: {len(self.prompts)} prompts for {self.scores.shape[0]} score rows")
        if not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("ReferencePool: prompts must be strings")
        if self.responses is not None and (
            len(self.responses) != self.num_prompts
            or any(len(row) != self.num_samples for row in self.responses)
        ):
            raise ValueError(
                f"ReferencePool: responses must be {self.num_prompts} rows of {self.num_samples} "
                "strings, matching scores [P, m]"
            )
        seen: dict[str, int] = {}
        for i, prompt in enumerate(self.prompts):
            if prompt in seen:
                raise ValueError(
                    f"ReferencePool: prompt {i} repeats prompt {seen[prompt]} ({prompt[:60]!r}); "
                    "merge their samples into one row"
                )
            seen[prompt] = i
        object.__setattr__(self, "_row", seen)
        self.scores.setflags(write=False)

    @property
    def num_prompts(self) -> int:
        return self.scores.shape[0]

    @property
    def num_samples(self) -> int:
        """m, the number of reference samples per prompt (calibration resolution is 1/m)."""
        return self.scores.shape[1]

    def rows(self, prompts) -> np.ndarray:
        """Row indices of ``prompts`` in the pool; raises KeyError naming a prompt it lacks."""
        out = []
        for prompt in prompts:
            try:
                out.append(self._row[prompt])
            except KeyError:
                raise KeyError(
                    f"prompt {prompt[:80]!r} has no reference samples in this pool; add it to the "
                    "pool or use a calibrated reward model for prompts outside it"
                ) from None
        return np.asarray(out, np.int32)

    def calibrate(self, prompts, scores) -> np.ndarray:
        """Calibrates ``scores`` [len(prompts), n] against the rows of ``prompts``, eagerly checked."""
        pool = self.scores[self.rows(prompts)]
        check_pool(pool, scores)
        return np.asarray(calibrate_sorted(scores, pool))

    def _response_lists(self):
        return None if self.responses is None else [list(row) for row in self.responses]

    def fingerprint(self) -> str:
        """sha256 of prompts, responses, scores and meta (stable across machines)."""
        return fingerprint(
            {"prompts": list(self.prompts), "responses": self._response_lists(),
             "scores": self.scores, "meta": self.meta}
        )

    def save(self, directory) -> Path:
        """Writes ``scores.npz`` and ``pool.json`` into ``directory``; the json, written last,
        records the fingerprint, so a partial or edited pool is detected on load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {
            "format": _POOL_FORMAT,
            "num_prompts": self.num_prompts,
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint(),
            "meta": self.meta,
            "prompts": list(self.prompts),
            "responses": self._response_lists(),
        }
        text = json.dumps(record, ensure_ascii=False, indent=1)  # fails before writing if meta is not JSON
        _atomic_write(directory / _POOL_NPZ, lambda f: np.savez(f, scores=self.scores))
        _atomic_write(directory / _POOL_JSON, lambda f: f.write(text.encode("utf-8")))
        return directory

    @classmethod
    def load(cls, directory) -> "ReferencePool":
        directory = Path(directory)
        json_path, npz_path = directory / _POOL_JSON, directory / _POOL_NPZ
        for path in (json_path, npz_path):
            if not path.is_file():
                raise FileNotFoundError(f"reference pool file {path} is missing; save the pool with ReferencePool.save")
        record = json.loads(json_path.read_text(encoding="utf-8"))
        if record.get("format") != _POOL_FORMAT:
            raise ValueError(f"{json_path}: unknown pool format {record.get('format')!r}, expected {_POOL_FORMAT}")
        with np.load(npz_path) as data:
            scores = data["scores"]
        responses = record["responses"]
        pool = cls(
            tuple(record["prompts"]),
            None if responses is None else tuple(tuple(r) for r in responses),
            scores,
            record["meta"],
        )
        if pool.fingerprint() != record["fingerprint"]:
            raise ValueError(
                f"reference pool in {directory} does not match its recorded fingerprint: the files "
                "were edited or only partly written; rebuild and save the pool again"
            )
        return pool


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
