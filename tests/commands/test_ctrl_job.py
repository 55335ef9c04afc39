"""`iapo ctrl`: checkpoints, SIGTERM preemption and an exact resume, through the real CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["--reward", "length", "--transform", "exp", "--t", "4", "--steps", "6", "--save-every", "1",
        "--train-prompts", "8", "--prompts-per-step", "8", "--samples-per-prompt", "4",
        "--pool-size", "8", "--max-new-tokens", "12", "--learning-rate", "1e-3", "--target-kl", "1.0"]


def _cmd(model, run_dir, *extra):
    return [sys.executable, "-m", "iapo_jax.cli", "ctrl", "--model", str(model), *ARGS,
            "--run-dir", str(run_dir), *extra]


def _final(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["metrics"]


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted_run(tiny_chat_llama_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_cmd(tiny_chat_llama_dir, tmp_path / "full"), capture_output=True,
                          text=True, env=env, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(tiny_chat_llama_dir, run), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 900
    while not (run / "checkpoints" / "1").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]  # preempted: not finished, resumable
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 6, f"the run finished before the preemption notice: {steps}"

    resumed = subprocess.run(_cmd(tiny_chat_llama_dir, run, "--resume"), capture_output=True,
                             text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stderr
    a, b = _final(tmp_path / "full"), _final(run)
    for key in ("loss", "raw_reward", "kl", "beta", "grad_norm"):
        assert a[key] == b[key], (key, a[key], b[key])


def test_resume_without_a_record_is_a_one_line_user_error(tmp_path, tiny_chat_llama_dir):
    done = subprocess.run(_cmd(tiny_chat_llama_dir, tmp_path / "nothing", "--resume"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "manifest" in done.stderr.lower()
