"""Run records: ``manifest.json`` in a run directory says how to rerun the job and what it gave.

A record holds the job name and its resolved config, the code version (git commit, a hash of
uncommitted changes, a hash of the package source), package versions, Python, host, JAX backend,
devices and mesh, the command line, seeds, data fingerprints, fingerprints of what the run read
(model weights, reward, pools) and wrote (samples, exported policy), checkpoint steps, final
metrics, timings and the run's status. Typical use (``commands.common.JobContext`` does all of this)::

    record = RunRecord(run_dir, job="ctrl", config=cfg)
    record.add_seed("seed", cfg.seed)
    record.set_mesh(mesh)
    with record.timer("train"):
        ...
    record.set_metrics({"win_rate": 0.61})
    record.finish("ok")            # writes manifest.json

Writes are atomic (temporary file + ``os.replace``): a reader sees the previous or the new record,
never half of one. Only process 0 writes; other processes keep an in-memory copy. A record that is
``held`` (a resumed run before it has saved anything new) is not written at all, so the previous
record stays byte for byte as it was until the new state is valid.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping

from iapo_jax.errors import IapoError
from iapo_jax.runtime import environment
from iapo_jax.runtime.jsonable import flatten_scalars, to_jsonable

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class MissingRecordError(IapoError, FileNotFoundError):
    """A directory that should hold a run record has no readable manifest.json."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory tree (relative names and contents, sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot fingerprint {path}: it does not exist")
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run directory's manifest.json; MissingRecordError (with the fix) when there is none."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise MissingRecordError(
            f"run directory {run_dir} does not exist; pass a folder written by an iapo job "
            "(it holds manifest.json)"
        )
    if not path.is_file():
        raise MissingRecordError(
            f"{run_dir} has no {MANIFEST}, so it is not a run directory; pass a folder written "
            "by an iapo job"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise MissingRecordError(f"{path} is unreadable ({err}); rerun the job to get a new record")
    if not isinstance(data, dict) or "job" not in data:
        raise MissingRecordError(f"{path} is not an iapo run record (no 'job' field)")
    return data


class RunRecord:
    """The record of one run; see the module docstring. ``data`` is the JSON document itself."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        job: str,
        config: Any = None,
        *,
        argv: list[str] | None = None,
        collect_environment: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST
        self.held = False  # True: write() leaves manifest.json alone (see the module docstring)
        self._started = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "job": job,
            "status": "running",
            "started": _now(),
            "finished": None,
            "command": {"argv": list(sys.argv if argv is None else argv), "cwd": os.getcwd()},
            "config_type": None,
            "config": None,
            "code": None,
            "packages": None,
            "python": None,
            "host": None,
            "jax": None,
            "mesh": None,
            "seeds": {},
            "data": {},
            "fingerprints": {},
            "checkpoints": [],
            "metrics": {},
            "timings": {},
            "extra": {},
            "error": None,
        }
        if config is not None:
            self.set_config(config)
        if collect_environment:
            self.data.update(
                code=environment.code_version(),
                packages=environment.package_versions(),
                python=environment.python_facts(),
                host=environment.host_facts(),
                jax=environment.jax_facts(),
            )

    # -- what the caller adds -------------------------------------------------------------------
    def set_config(self, config: Any) -> None:
        """The resolved config (a dataclass is stored as a dict of its fields)."""
        cls = type(config)
        self.data["config_type"] = f"{cls.__module__}.{cls.__qualname__}"
        self.data["config"] = to_jsonable(config)

    def set_mesh(self, mesh: Any) -> None:
        """A jax.sharding.Mesh (axis name -> size) or a plain mapping."""
        shape = getattr(mesh, "shape", mesh)
        self.data["mesh"] = {str(k): int(v) for k, v in dict(shape).items()}

    def add_seed(self, name: str, seed: int) -> None:
        self.data["seeds"][name] = int(seed)

    def add_data(
        self, name: str, sha256: str | None = None, *, path: str | os.PathLike | None = None,
        **details: Any,
    ) -> str:
        """Record a data fingerprint: a precomputed hex digest, or a file/folder ``path`` to hash.

        ``details`` (sizes, splits, ...) are stored next to the digest.
        """
        if (sha256 is None) == (path is None):
            raise ValueError(f"add_data({name!r}): pass exactly one of sha256= or path=")
        if path is not None:
            sha256 = file_fingerprint(path)
            details["path"] = str(path)
        self.data["data"][name] = {"sha256": str(sha256), **to_jsonable(details)}
        return str(sha256)

    def add_fingerprint(self, name: str, sha256: str, /, *, role: str, **details: Any) -> str:
        """What the run read (``role="input"``: weights, reward, pool) or wrote (``"output"``)."""
        if role not in ("input", "output"):
            raise ValueError(f"add_fingerprint({name!r}): role must be 'input' or 'output'")
        self.data["fingerprints"][name] = {"sha256": str(sha256), "role": role,
                                           **to_jsonable(details)}
        return str(sha256)

    def add_checkpoint(self, step: int) -> None:
        steps = self.data["checkpoints"]
        if int(step) not in steps:
            steps.append(int(step))

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Final metrics: numeric leaves of (possibly nested) ``metrics``, keyed "a.b[i]"."""
        self.data["metrics"].update(flatten_scalars(dict(metrics)))

    def add_timing(self, name: str, seconds: float) -> None:
        self.data["timings"][name] = round(float(seconds), 6)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Time a block; repeated names accumulate."""
        start = time.perf_counter()
        try:
            yield
        finally:
            previous = self.data["timings"].get(name, 0.0)
            self.add_timing(name, previous + time.perf_counter() - start)

    def set_extra(self, key: str, value: Any) -> None:
        """Job-specific facts worth keeping (e.g. which run a reproduction reran)."""
        self.data["extra"][key] = to_jsonable(value)

    # -- lifecycle ------------------------------------------------------------------------------
    def finish(self, status: str = "ok", error: BaseException | None = None) -> Path:
        """Mark the run finished ("ok", "failed", "interrupted", "preempted") and write it."""
        self.data["status"] = status
        self.data["finished"] = _now()
        self.data["timings"].setdefault("total", round(time.perf_counter() - self._started, 6))
        if error is not None:
            self.data["error"] = {
                "type": type(error).__name__,
                "message": str(error),
                "traceback": "".join(traceback.format_exception(error)),
            }
        return self.write()

    def write(self) -> Path:
        """Write manifest.json atomically (process 0 only; others return the path unchanged)."""
        if _is_writer() and not self.held:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)
        return self.path
