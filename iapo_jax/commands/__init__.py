"""The jobs behind ``iapo <job>``: one module per job, found by name and imported on demand.

A job module ``iapo_jax/commands/<name>.py`` (dashes become underscores) declares itself in one
place, ``JOB = JobSpec(config=..., run=run, ...)``: its frozen dataclass config, its ``run(cfg)``
(which may return a dict whose numbers become the run's final metrics), and how the command line
treats its runs (what ``iapo reproduce`` ignores, whether it resumes and what a resume may change,
...; see JobSpec). Config fields must not be called ``config``, ``run_dir`` or ``resume``: every job
gets those as options. Inside ``run``, ``commands.common.current_context()`` gives the run
directory, record and metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from types import ModuleType
from typing import Any, Callable, Mapping

from iapo_jax.errors import IapoError

# name -> one-line summary shown by `iapo --help` (kept here so the help needs no imports).
JOBS: dict[str, str] = {
    "quickstart": "calibrate, run a short CTRL and evaluate best-of-N on the embedded default model",
    "train-rm": "train a Bradley-Terry reward model on preference pairs",
    "calibrate": "calibrate a reward under the reference policy",
    "train-scorer": "train a prefix scorer (CD-FUDGE / CD-Q) for controlled decoding",
    "ctrl": "inference-aware RL (CTRL) against a calibrated, transformed reward",
    "compare": "CTRL vs calibrated / raw-reward RLHF at matched KL, under best- or worst-of-N",
    "generate": "sample: plain, best-of-N, blockwise or token-level controlled decoding",
    "eval": "inference-time win rates and KL of policies",
    "theory": "closed-form win rates and KL for best-of-N / worst-of-N and reward transforms",
    "testbed": "CTRL against the exact optimum on policies small enough to enumerate",
    "bench": "decoding throughput against transformers",
    "reproduce": "rerun a recorded run into a new run directory and compare its metrics",
    "runs": "list run records (job, date, status, settings, metrics, commit) or compare two",
    "env": "record the software and hardware environment and run a small sharded smoke test",
}
RESERVED_FIELDS = ("config", "run_dir", "resume")


class UnknownJobError(IapoError, ValueError):
    """The job name is not one of JOBS, or its module is not part of this version."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a job declares about itself (``JOB = JobSpec(...)`` in its module)."""

    config: type  # the frozen dataclass of its options
    run: Callable[..., Any]  # run(cfg) -> dict of final metrics (or None)
    reproduce_ignore: tuple[str, ...] = ()  # metric-name patterns `iapo reproduce` does not compare
    resumable: bool = False  # it checkpoints, so `--resume` continues a recorded run
    resume_safe: tuple[str, ...] = ()  # settings a resume may change (steps may only grow)
    narrow_resume_safe: Callable[[dict], tuple[str, ...]] | None = None  # resume_safe as a function
    # of the recorded config, where it depends on it
    record_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # what keys added
    # since imply for records written before them
    single_process: bool = False  # takes no multi-process flags
    recordless: bool = False  # reads records and writes none: no --run-dir, --config, --resume
    manages_run_dir: bool = False  # run(cfg, run_dir=...) opens its own run record


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    module: ModuleType
    spec: JobSpec

    @property
    def config_type(self) -> type:
        return self.spec.config

    @property
    def run(self) -> Callable[..., Any]:
        return self.spec.run

    @property
    def summary(self) -> str:
        return JOBS.get(self.name, "")


def module_name(job: str) -> str:
    return f"{__name__}.{job.replace('-', '_')}"


def is_available(job: str) -> bool:
    """Whether the job's module exists (checked without importing it)."""
    return job in JOBS and importlib.util.find_spec(module_name(job)) is not None


def load_job(name: str) -> Job:
    """Import a job's module and find its config type and run function."""
    if name not in JOBS:
        raise UnknownJobError(f"unknown job {name!r}; choose one of: {', '.join(available_jobs())}")
    if not is_available(name):
        raise UnknownJobError(f"job {name!r} is not available in this version yet; see `iapo --help`")
    module = importlib.import_module(module_name(name))
    spec = getattr(module, "JOB", None)
    if not isinstance(spec, JobSpec):
        raise TypeError(f"{module.__name__} declares no JOB = JobSpec(config=..., run=run)")
    if dataclasses.is_dataclass(spec.config):
        clash = [f.name for f in dataclasses.fields(spec.config) if f.name in RESERVED_FIELDS]
        if clash:
            raise TypeError(f"{spec.config.__name__} must not define {clash}: every job has them")
    return Job(name, module, spec)


def available_jobs() -> list[str]:
    return [name for name in JOBS if is_available(name)]
