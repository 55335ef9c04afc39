"""Multi-process start-up on JAX's own runtime (``jax.distributed``); a no-op for one process.

Call ``initialize_distributed()`` first thing in a program, before anything touches a JAX device:
JAX fixes the set of devices the first time a backend is used. Where the settings come from:

1. arguments ``coordinator``, ``num_processes``, ``process_id`` (the CLI's flags);
2. environment ``IAPO_COORDINATOR``, ``IAPO_NUM_PROCESSES``, ``IAPO_PROCESS_ID``;
3. JAX's own ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
4. a cluster JAX detects by itself (Cloud TPU VM pods, SLURM, Open MPI): ``jax.distributed``
   is called without arguments and fills everything in;
5. otherwise nothing happens and the program runs as a single process.
"""

from __future__ import annotations

import dataclasses
import os

ENV_COORDINATOR = "IAPO_COORDINATOR"
ENV_NUM_PROCESSES = "IAPO_NUM_PROCESSES"
ENV_PROCESS_ID = "IAPO_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """How this process was started. ``source`` says which rule of the module docstring applied."""

    process_id: int
    num_processes: int
    coordinator: str | None
    source: str  # "arguments", "iapo-env", "jax-env", "cluster", "single", "already"


def _env_int(*names: str) -> int | None:
    for name in names:
        raw = os.environ.get(name)
        if raw not in (None, ""):
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None
    return None


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not started
        return False


def _cluster_detected() -> bool:
    """A launcher JAX can read by itself: TPU VM pod worker, SLURM with >1 task, Open MPI."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if "OMPI_MCA_orte_hnp_uri" in os.environ:
        return True
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hostnames or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:  # a Cloud TPU VM, where JAX asks the metadata server for the worker list
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm

        return bool(running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> DistributedInfo:
    """Join (or create) a multi-process JAX run; see the module docstring for the sources.

    Raises ValueError for incomplete or inconsistent settings and RuntimeError when the JAX backend
    was already used (then it is too late for JAX to see the other processes' devices).
    """
    import jax

    if jax.distributed.is_initialized():
        return DistributedInfo(jax.process_index(), jax.process_count(), None, "already")

    source = "arguments"
    if coordinator is None and num_processes is None and process_id is None:
        coordinator = os.environ.get(ENV_COORDINATOR) or None
        num_processes = _env_int(ENV_NUM_PROCESSES)
        process_id = _env_int(ENV_PROCESS_ID)
        source = "iapo-env"
    if coordinator is None and num_processes is None and process_id is None:
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = _env_int("JAX_NUM_PROCESSES")
        process_id = _env_int("JAX_PROCESS_ID")
        source = "jax-env"

    explicit = (coordinator, num_processes, process_id)
    if all(v is None for v in explicit):
        if not _cluster_detected():
            return DistributedInfo(0, 1, None, "single")
        _refuse_if_backend_started()
        jax.distributed.initialize()
        return DistributedInfo(jax.process_index(), jax.process_count(), None, "cluster")

    if num_processes == 1 and process_id in (None, 0):
        return DistributedInfo(0, 1, coordinator, "single")
    names = ("coordinator", "num_processes", "process_id")
    missing = [n for n, v in zip(names, explicit) if v is None]
    if missing:
        raise ValueError(
            f"multi-process settings from {source} are incomplete: missing {', '.join(missing)}; "
            f"give all three (flags --coordinator HOST:PORT --num-processes N --process-id I, or "
            f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})"
        )
    if ":" not in coordinator:
        raise ValueError(f"coordinator {coordinator!r} needs a port, e.g. 10.0.0.2:1234")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, num_processes); got process_id={process_id}, "
            f"num_processes={num_processes}"
        )
    _refuse_if_backend_started()
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return DistributedInfo(process_id, num_processes, coordinator, source)


def _refuse_if_backend_started() -> None:
    if _backend_started():
        raise RuntimeError(
            "initialize_distributed() was called after JAX already used a device, so the other "
            "processes' devices can no longer join; call it first thing in the program"
        )


def is_main_process() -> bool:
    """True on JAX process 0 (the one that writes logs and run records)."""
    import jax

    return jax.process_index() == 0
