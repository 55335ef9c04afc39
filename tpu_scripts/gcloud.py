"""gcloud command lines for Cloud TPU VMs, as argument lists (pure functions: nothing runs here).

A TPU is created either directly (``tpu-vm create``) or as a queued resource whose node carries the
same name (``queued-resources create --node-id``); after that, ssh, scp and describe address the
node by name either way. Deleting a queued resource with ``--force`` deletes its node too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

PROVISIONING = ("on-demand", "spot", "reserved")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ACCELERATOR = re.compile(r"^v\d+[a-z]*(pod)?-\d+$")


class TpuScriptError(ValueError):
    """A flag value that would make gcloud fail (or do the wrong thing)."""


@dataclasses.dataclass(frozen=True)
class Tpu:
    """Which TPU: its name, zone, project (None: gcloud's configured project) and how it was made."""

    name: str
    zone: str
    project: str | None = None
    queued: bool = False

    def __post_init__(self):
        if not _NAME.match(self.name or ""):
            raise TpuScriptError(
                f"TPU name {self.name!r} is not valid: use 1-63 lowercase letters, digits and "
                "dashes, starting with a letter (e.g. iapo-ctrl)")
        if not self.zone:
            raise TpuScriptError("no zone: pass --zone (e.g. us-west4-a for v5e) or set "
                                 "CLOUDSDK_COMPUTE_ZONE")

    @property
    def queued_resource(self) -> str:
        return f"{self.name}-qr"

    def scope(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def _tpu_vm(tpu: Tpu, verb: str, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *tpu.scope()]


def _queued(tpu: Tpu, verb: str, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, *args, *tpu.scope()]


def check_accelerator(accelerator_type: str) -> None:
    if not _ACCELERATOR.match(accelerator_type or ""):
        raise TpuScriptError(f"accelerator type {accelerator_type!r} is not of the form "
                             "v5litepod-16, v4-32, v5p-64 or v6e-8")


def create(tpu: Tpu, accelerator_type: str, runtime_version: str, provisioning: str = "on-demand",
           valid_until: str | None = None, extra_flags: Sequence[str] = ()) -> list[str]:
    """The command that creates the TPU VM (or requests it as a queued resource)."""
    check_accelerator(accelerator_type)
    if provisioning not in PROVISIONING:
        raise TpuScriptError(f"provisioning {provisioning!r}: choose one of {', '.join(PROVISIONING)}")
    if provisioning == "reserved" and not tpu.queued:
        raise TpuScriptError("reserved capacity is requested through a queued resource: add --queued")
    if valid_until and not tpu.queued:
        raise TpuScriptError("--valid-until applies to queued resources only: add --queued")
    model = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[provisioning]
    if tpu.queued:
        args = [tpu.queued_resource, f"--node-id={tpu.name}", f"--accelerator-type={accelerator_type}",
                f"--runtime-version={runtime_version}", *model]
        if valid_until:
            args.append(f"--valid-until-duration={valid_until}")
        return _queued(tpu, "create", *args, *extra_flags)
    return _tpu_vm(tpu, "create", tpu.name, f"--accelerator-type={accelerator_type}",
                   f"--version={runtime_version}", *model, *extra_flags)


def queued_state(tpu: Tpu) -> list[str]:
    """Prints the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED...)."""
    return _queued(tpu, "describe", tpu.queued_resource, "--format=value(state.state)")


def describe(tpu: Tpu) -> list[str]:
    return _tpu_vm(tpu, "describe", tpu.name, "--format=yaml(name,state,acceleratorType,health)")


def ssh(tpu: Tpu, command: str, worker: str = "all") -> list[str]:
    """Run a shell command on one worker or on all of them at once."""
    return _tpu_vm(tpu, "ssh", tpu.name, f"--worker={worker}", f"--command={command}")


def scp_to(tpu: Tpu, local: Sequence[str], remote_dir: str, worker: str = "all",
           recurse: bool = False) -> list[str]:
    """Copy local files (folders with recurse) into ``remote_dir`` (relative to home) on workers."""
    return _tpu_vm(tpu, "scp", *(["--recurse"] if recurse else []), *local,
                   f"{tpu.name}:{remote_dir}", f"--worker={worker}")


def scp_from(tpu: Tpu, remote: str, local_dir: str, worker: str = "all") -> list[str]:
    """Copy ``remote`` (relative to home) from workers into ``local_dir``; files of all workers land
    side by side, so remote file names must differ between workers (or come from one worker)."""
    return _tpu_vm(tpu, "scp", "--recurse", f"{tpu.name}:{remote}", local_dir, f"--worker={worker}")


def delete(tpu: Tpu) -> list[str]:
    if tpu.queued:
        return _queued(tpu, "delete", tpu.queued_resource, "--force", "--quiet")
    return _tpu_vm(tpu, "delete", tpu.name, "--quiet")
