"""What every job shares: its run directory, run record, metrics, seeds, timings and summary.

The CLI opens a ``JobContext`` around ``job.run(cfg)``; inside, a job asks for it with
``current_context()``. A job that is also called from Python (a notebook) uses ``job_context``,
which reuses the CLI's context or opens its own::

    def run(cfg: CtrlConfig) -> dict:
        with job_context("ctrl", cfg) as ctx:
            key = ctx.key(cfg.seed)                  # recorded in the manifest
            mesh = make_mesh(cfg.data, cfg.fsdp, cfg.tensor); ctx.set_mesh(mesh)
            ctx.add_data("prompts", prompts)         # fingerprint
            ckpt = ctx.checkpointer(keep_last=2)     # <run_dir>/checkpoints, steps recorded
            for step in ctx.progress(range(cfg.steps), desc="ctrl"):
                ...
                ctx.log(step, loss=loss, reward=reward)   # metrics.jsonl + TensorBoard
            return {"win_rate": wr}                  # final metrics, compared by `iapo reproduce`

On exit the record gets status, metrics, timings and checkpoint steps, and process 0 prints a
summary table (to stderr, so stdout stays free for a job's own output).

What is saved is never lost: a new run refuses a folder that holds anything, and a resumed run
leaves the previous record untouched until it has saved new state (a checkpoint or its result).
SIGTERM stops the run at a step boundary (see ``runtime.signals``) and the record says
"preempted"; nothing that happens while the record is written can leave it at "running".
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from iapo_jax.errors import IapoError
from iapo_jax.runtime import signals
from iapo_jax.runtime.jsonable import flatten_scalars
from iapo_jax.runtime.manifest import MANIFEST, RunRecord

RUNS_ROOT = Path("runs")
CHECKPOINT_DIR = "checkpoints"
_SUMMARY_ROWS = 40

_current: contextvars.ContextVar["JobContext | None"] = contextvars.ContextVar("job", default=None)


class RunDirError(IapoError, ValueError):
    """The run directory cannot be used as asked (already used, or missing when resuming)."""


def check_new_run_dir(path: Path, *, resumable: bool = True) -> None:
    """A new run goes into a folder that does not exist yet or is empty; anything else is refused
    before a byte is written, so nobody's files (or an earlier run) are overwritten."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path} is a file, not a folder; pass a new folder name")
    if (path / MANIFEST).exists():
        fix = "pass --resume to continue it or choose" if resumable else "choose"
        raise RunDirError(f"{path} already holds a run; {fix} a new --run-dir")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise RunDirError(f"--run-dir {path} is not empty (it holds {shown}) and is not a run "
                              "directory; pass a new or empty folder (nothing in it was touched)")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
        raise RunDirError(f"cannot create the run directory {path}: {ancestor} is not a writable "
                          "folder; pass a --run-dir you can write to")


@contextlib.contextmanager
def _unwritable(path: Path) -> Iterator[None]:
    """A run directory that cannot be written (a read-only filesystem, a full disk, no permission)
    is bad input: one line naming the folder and the reason, before any compute."""
    try:
        yield
    except OSError as err:
        if isinstance(err, IapoError):
            raise
        reason = err.strerror or type(err).__name__
        raise RunDirError(f"cannot write the run directory {path} ({reason}); choose a --run-dir "
                          "on a writable filesystem") from None


def current_context() -> "JobContext | None":
    """The JobContext of the job running now, or None outside a job."""
    return _current.get()


def _agree_across_processes(path: Path) -> Path:
    """Every process uses process 0's choice (default names contain a timestamp)."""
    import jax

    if jax.process_count() == 1:
        return path
    import numpy as np
    from jax.experimental import multihost_utils

    raw = str(path).encode()[:1024].ljust(1024, b"\0")
    agreed = multihost_utils.broadcast_one_to_all(np.frombuffer(raw, dtype=np.uint8))
    return Path(bytes(np.asarray(agreed, dtype=np.uint8)).rstrip(b"\0").decode())


def new_run_dir(job: str, root: str | Path = RUNS_ROOT) -> Path:
    """A fresh ``<root>/<job>-<YYYYmmdd-HHMMSS>[-k]`` name (not yet created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = Path(root) / f"{job}-{stamp}"
    k = 1
    while candidate.exists():
        candidate = Path(root) / f"{job}-{stamp}-{k}"
        k += 1
    return candidate


class JobContext:
    """Run directory, RunRecord, MetricsWriter, seeds and timings of one job; see module docstring.

    Args:
      job: the job's name (as in ``iapo <job>``).
      config: the resolved config (stored in the record).
      run_dir: where to write; default ``runs/<job>-<time>``. Without ``resume`` it must not
        already hold a run; with ``resume`` it must.
      resume: continue the run in ``run_dir`` (jobs read ``ctx.resume`` to restore checkpoints).
      argv: the command line to record (default ``sys.argv``).
      tensorboard: also write TensorBoard events.
    """

    def __init__(self, job: str, config: Any, run_dir: str | Path | None = None, *,
                 resume: bool = False, argv: list[str] | None = None, tensorboard: bool = True,
                 resumable: bool = True):
        self.job = job
        self.resumable = resumable
        self.config = config
        self.resume = resume
        self._requested_dir = None if run_dir is None else Path(run_dir)
        self._argv = argv
        self._tensorboard = tensorboard
        self._checkpointers: list[Any] = []
        self._final: dict[str, Any] = {}
        self._token = None
        self._previous: dict[str, Any] | None = None
        self._complete = False
        self._signals = False
        self.status = "running"
        self.run_dir: Path = Path()
        self.record: RunRecord
        self.metrics: Any

    # -- entering and leaving -------------------------------------------------------------------
    def _prepare_run_dir(self) -> Path:
        from iapo_jax.commands.resume import load_previous

        requested = self._requested_dir
        if self.resume:
            self._previous = load_previous(self.job, requested)  # says how to fix it
            return requested
        if requested is None:
            requested = _agree_across_processes(new_run_dir(self.job))
        check_new_run_dir(requested, resumable=self.resumable)
        return requested

    def __enter__(self) -> "JobContext":
        from iapo_jax.parallel.distributed import is_main_process
        from iapo_jax.runtime.metrics import MetricsWriter

        self.run_dir = self._prepare_run_dir()
        self.is_main = is_main_process()
        self._created_dir = not self.run_dir.exists()
        if self.is_main:
            with _unwritable(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
        self.record = RunRecord(self.run_dir, self.job, self.config, argv=self._argv)
        if self._previous is not None:
            # Until this attempt has saved something new, the previous record is the truth.
            self.record.held = True
            attempts = list(self._previous.get("extra", {}).get("attempts", []))
            attempts.append({k: self._previous.get(k) for k in ("started", "finished", "status")})
            self.record.set_extra("attempts", attempts)
            for step in self._previous.get("checkpoints", []):
                self.record.add_checkpoint(step)
        for name, value in flatten_scalars(self.config).items():
            leaf = name.rsplit(".", 1)[-1]
            if (leaf == "seed" or leaf.endswith("_seed")) and isinstance(value, int):
                self.record.add_seed(name, value)
        # The handler goes in before the record is written: a SIGTERM that finds the record (a
        # scheduler, or a test, waiting for it) must find the handler too, not the default one.
        self._signals = signals.install()
        try:
            with _unwritable(self.run_dir):
                self.metrics = MetricsWriter(self.run_dir, tensorboard=self._tensorboard)
                with signals.shield():  # a notice during the write only sets the flag (below)
                    self.record.write()
        except BaseException as exc:
            if self._signals:
                signals.uninstall()
                self._signals = False
            if isinstance(exc, RunDirError) and self._created_dir and self.is_main:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # leave nothing half-made behind
            raise
        self._token = _current.set(self)
        try:
            if signals.requested():  # the notice came while the record was being written
                raise signals.Preempted("preempted by SIGTERM before the job started")
        except signals.Preempted as exc:  # the job never ran: its record still says so
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with signals.shield():  # no signal may leave the record at "running"
            self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        _current.reset(self._token)
        stopped = False
        try:
            for ckpt in self._checkpointers:
                with contextlib.suppress(Exception):
                    stopped = stopped or ckpt.should_stop
                    ckpt.close()
            status = "preempted" if stopped and not self._complete else "ok"
            if isinstance(exc, signals.Preempted):
                status = "preempted"
            elif isinstance(exc, KeyboardInterrupt):
                status = "interrupted"
            elif exc is not None:
                status = "failed"
            self.status = status
            if exc is not None:
                # What the CLI needs to say how to continue (the exception is all it gets).
                with contextlib.suppress(AttributeError):
                    exc.iapo_run_dir = self.run_dir  # type: ignore[attr-defined]
                    exc.iapo_checkpoints = list(self.record.data["checkpoints"])  # type: ignore
            self.metrics.close()
            if self._rejected_input(exc):
                # Bad input caught before any result existed: leave no run directory behind.
                shutil.rmtree(self.run_dir, ignore_errors=True)
                return
            if status == "ok":
                self.record.held = False  # a finished result is new, valid state
            self.record.set_metrics(self._final)
            self.record.finish(status, error=exc)
            if status == "ok" and self.is_main:
                self.print_summary()
        finally:
            if self._signals:
                signals.uninstall()
                self._signals = False

    def _rejected_input(self, exc: BaseException | None) -> bool:
        if not (isinstance(exc, (IapoError, ValueError)) and self.is_main and self._created_dir):
            return False
        return [p.name for p in self.run_dir.iterdir()] == [MANIFEST]

    # -- what jobs call -------------------------------------------------------------------------
    def key(self, seed: int, name: str = "seed"):
        """``jax.random.key(seed)``, with the seed recorded under ``name``."""
        import jax

        self.record.add_seed(name, seed)
        return jax.random.key(seed)

    def set_mesh(self, mesh: Any) -> None:
        self.record.set_mesh(mesh)

    def mesh(self, flags: Any) -> Any:
        """The mesh of a config's --data/--fsdp/--tensor (recorded), or None for 1/1/1 (unsharded)."""
        if (flags.data, flags.fsdp, flags.tensor) == (1, 1, 1):
            return None
        from iapo_jax.parallel.mesh import make_mesh

        mesh = make_mesh(flags.data, flags.fsdp, flags.tensor)
        self.set_mesh(mesh)
        return mesh

    def add_data(self, name: str, data: Any = None, *, path: str | os.PathLike | None = None,
                 **details: Any) -> str:
        """Fingerprint in-memory ``data`` (prompts, arrays, ...) or a file/folder ``path``."""
        if path is not None:
            return self.record.add_data(name, path=path, **details)
        from iapo_jax.data.fingerprint import fingerprint

        return self.record.add_data(name, fingerprint(data), **details)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Step metrics to metrics.jsonl and TensorBoard (process 0)."""
        self.metrics.write(step, {**(metrics or {}), **more})

    def timer(self, name: str):
        """``with ctx.timer("calibrate"): ...`` adds the seconds to the record's timings."""
        return self.record.timer(name)

    def progress(self, iterable=None, **kwargs):
        """Progress of a loop on process 0: a bar (rate, ETA) in a terminal or notebook, a line
        every 30 s in a log, nothing with --quiet (see ``runtime.progress``)."""
        from iapo_jax.runtime.progress import progress

        return progress(iterable, **kwargs)

    def checkpointer(self, **options: Any):
        """A Checkpointer in ``<run_dir>/checkpoints`` whose saved steps go into the record."""
        from iapo_jax.runtime.checkpointing import Checkpointer

        ckpt = Checkpointer(self.run_dir / CHECKPOINT_DIR, on_save=self._on_checkpoint, **options)
        self._checkpointers.append(ckpt)
        return ckpt

    def _on_checkpoint(self, step: int) -> None:
        self.record.add_checkpoint(step)
        self.record.held = False  # new state exists: from here on the record describes it
        self.record.write()  # a preempted run's record still lists its last checkpoint

    def mark_complete(self) -> None:
        """The job reached its end: a preemption notice that came during the last step does not
        make it "preempted"."""
        self._complete = True

    def stop_if_preempted(self, save: Any, step: int) -> None:
        """After a training step: on a preemption notice, checkpoint with ``save()`` and stop
        (raises ``Preempted``), for loops that save through their own trainer."""
        if not signals.requested():
            return
        with signals.shield():
            save()
            for ckpt in self._checkpointers:
                ckpt.wait()
        raise signals.Preempted(f"preempted at step {step}")

    # -- fingerprints of what the run read and wrote ---------------------------------------------
    def fingerprint_model(self, name: str, source: Any) -> str:
        """Content hash of a model's weights (streamed), so a replaced checkpoint is noticed."""
        from iapo_jax.models.fingerprint import model_fingerprint

        with self.timer("fingerprints"):
            info = model_fingerprint(source)
        return self.record.add_fingerprint(name, info.pop("sha256"), role="input", **info)

    def fingerprint_reward(self, name: str, reward: str, options: Mapping[str, Any] | None = None
                           ) -> str:
        """A reward or scorer by name, options and the files an option points to."""
        from iapo_jax.runtime.fingerprints import reward_fingerprint

        with self.timer("fingerprints"):
            info = reward_fingerprint(reward, options)
        return self.record.add_fingerprint(name, info.pop("sha256"), role="input", **info)

    def fingerprint_input(self, name: str, path: Any) -> str:
        """A file or folder the run read (a trained scorer, a pool folder)."""
        from iapo_jax.runtime.fingerprints import path_fingerprint

        with self.timer("fingerprints"):
            digest = path_fingerprint(path)
        return self.record.add_fingerprint(name, digest, role="input", path=str(path))

    def fingerprint_output(self, name: str, path: Any = None, *, sha256: str | None = None) -> str | None:
        """A file or folder the run wrote (relative to the run directory), or a precomputed hash."""
        from iapo_jax.runtime.fingerprints import tree_fingerprint

        if sha256 is None:
            target = self.run_dir / path
            if not target.exists():  # written by process 0 only
                return None
            sha256 = tree_fingerprint(target)
        details = {"path": str(path)} if path is not None else {}
        return self.record.add_fingerprint(name, sha256, role="output", **details)

    def set_result(self, metrics: Mapping[str, Any]) -> None:
        """Final metrics (numeric leaves, nested keys joined with '.')."""
        self._final.update(flatten_scalars(dict(metrics)))

    def print_summary(self, file=None) -> None:
        from iapo_jax.runtime.progress import print_table

        rows = [{"metric": k, "value": v} for k, v in list(self._final.items())[:_SUMMARY_ROWS]]
        if len(self._final) > _SUMMARY_ROWS:
            rows.append({"metric": f"... {len(self._final) - _SUMMARY_ROWS} more", "value": ""})
        total = self.record.data["timings"].get("total", 0.0)
        title = f"{self.job}: done in {total:.1f} s; run record in {self.run_dir}"
        if rows:
            print_table(rows, title=title, file=file)
        else:
            print(title, file=file or sys.stderr)


@contextlib.contextmanager
def job_context(job: str, config: Any, run_dir: str | Path | None = None, **kwargs: Any
                ) -> Iterator[JobContext]:
    """The running job's context when there is one for ``job``, else a new one (closed on exit)."""
    active = current_context()
    if active is not None and active.job == job:
        yield active
        return
    with JobContext(job, config, run_dir, **kwargs) as ctx:
        yield ctx


def run_job(job: Any, config: Any, *, run_dir: str | Path | None = None, resume: bool = False,
            argv: list[str] | None = None, extra: Mapping[str, Any] | None = None) -> JobContext:
    """Run ``job`` (a ``commands.Job``) with ``config`` inside a JobContext; returns the context.

    The numbers in the dict ``job.run`` returns become the record's final metrics; ``ctx.status``
    says how it ended ("ok" or "preempted"; other endings raise).
    """
    with JobContext(job.name, config, run_dir, resume=resume, argv=argv,
                    resumable=job.spec.resumable) as ctx:
        for key, value in (extra or {}).items():
            ctx.record.set_extra(key, value)
        result = job.run(config)
        if isinstance(result, Mapping):
            ctx.set_result(result)
    return ctx
