"""The jobs behind ``iapo <job>``: one module per job, found by name and imported on demand.

A job module ``iapo_jax/commands/<name>.py`` (dashes become underscores) exposes a frozen dataclass
config and ``run(cfg)``; ``run`` may return a dict whose numbers become the run's final metrics.
The config type is read from ``run``'s annotation (or a module attribute ``CONFIG``). Config
fields must not be called ``config``, ``run_dir`` or ``resume``: every job gets those as options.
A module may set ``REPRODUCE_IGNORE = ("*tokens_per_s*", ...)``: metric-name patterns that
``iapo reproduce`` does not compare (timings and other numbers that vary from run to run).
Inside ``run``, ``commands.common.current_context()`` gives the run directory, record and metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import typing
from types import ModuleType
from typing import Any, Callable

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
class Job:
    name: str
    module: ModuleType
    config_type: type
    run: Callable[..., Any]

    @property
    def summary(self) -> str:
        return JOBS.get(self.name, "")


def module_name(job: str) -> str:
    return f"{__name__}.{job.replace('-', '_')}"


def is_available(job: str) -> bool:
    """Whether the job's module exists (checked without importing it)."""
    return job in JOBS and importlib.util.find_spec(module_name(job)) is not None


def _config_type(module: ModuleType, run: Callable) -> type:
    explicit = getattr(module, "CONFIG", None)
    if explicit is not None:
        return explicit
    params = list(inspect.signature(run).parameters)
    try:
        hints = typing.get_type_hints(run)
    except (NameError, TypeError):  # an annotation that does not resolve: use the fallback
        hints = {}
    if params and params[0] in hints:
        return hints[params[0]]
    candidates = [
        obj for name, obj in vars(module).items()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and name.endswith("Config")
        and obj.__module__ == module.__name__
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise TypeError(
        f"{module.__name__}: cannot tell the config type; annotate run(cfg: MyConfig) or set CONFIG"
    )


def load_job(name: str) -> Job:
    """Import a job's module and find its config type and run function."""
    if name not in JOBS:
        raise UnknownJobError(f"unknown job {name!r}; choose one of: {', '.join(available_jobs())}")
    if not is_available(name):
        raise UnknownJobError(f"job {name!r} is not available in this version yet; see `iapo --help`")
    module = importlib.import_module(module_name(name))
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"{module.__name__} has no run(cfg) function")
    config_type = _config_type(module, run)
    if dataclasses.is_dataclass(config_type):
        clash = [f.name for f in dataclasses.fields(config_type) if f.name in RESERVED_FIELDS]
        if clash:
            raise TypeError(f"{config_type.__name__} must not define {clash}: every job has them")
    return Job(name, module, config_type, run)


def available_jobs() -> list[str]:
    return [name for name in JOBS if is_available(name)]
