"""Fault injection: what users type and what schedulers send must never lose or corrupt a run.

One row per case of the "runs never lose what is saved" list. Cheap rows (refusals that happen
before any model loads, checkpoint damage, SIGKILL of a small training loop during its saves) run
everywhere; rows that train `iapo ctrl` on the tiny chat model are marked slow. Every row checks
that the record and the checkpoints stay valid; the ctrl rows also check that a resumed run equals
an uninterrupted one bit for bit and that `iapo reproduce` confirms it.
"""

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from iapo_jax import cli
from iapo_jax.runtime.manifest import MANIFEST, load_record

STEPS = 4
CTRL_ARGS = ["--reward", "length", "--transform", "exp", "--t", "4", "--save-every", "1",
             "--train-prompts", "4", "--prompts-per-step", "4", "--samples-per-prompt", "2",
             "--pool-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-3",
             "--target-kl", "1.0"]
TRAINED = ("loss", "raw_reward", "kl", "beta", "grad_norm", "step")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _ctrl(model, run_dir, *extra, steps=STEPS):
    return [sys.executable, "-m", "iapo_jax.cli", "ctrl", "--model", str(model), *CTRL_ARGS,
            "--steps", str(steps), "--run-dir", str(run_dir), *extra]


def _resume(run_dir, *extra):
    return [sys.executable, "-m", "iapo_jax.cli", "ctrl", "--run-dir", str(run_dir), "--resume",
            *extra]


def _run(cmd, timeout=900):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line(err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _checkpoint_steps(run_dir):
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _assert_valid(run_dir, *, status=None):
    """The record parses, is not left "running", and lists every finished checkpoint on disk."""
    record = load_record(run_dir)
    if status is not None:
        assert record["status"] == status, record["status"]
    assert set(_checkpoint_steps(run_dir)) <= set(record["checkpoints"]), (
        _checkpoint_steps(run_dir), record["checkpoints"])
    return record


def _assert_same_run(a, b):
    ra, rb = load_record(a), load_record(b)
    for key in TRAINED:
        assert ra["metrics"][key] == rb["metrics"][key], (key, ra["metrics"][key], rb["metrics"][key])
    assert ra["fingerprints"]["policy"]["sha256"] == rb["fingerprints"]["policy"]["sha256"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------
# A finished ctrl record for the refusal rows: they never get as far as loading a model, so a
# record as `iapo ctrl` writes it is enough (its config is the one a real run records).
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def finished_record(in_tmp, tiny_chat_llama_dir):
    from iapo_jax.commands import load_job
    from iapo_jax.commands.configs import config_from_mapping
    from iapo_jax.runtime.manifest import RunRecord

    job = load_job("ctrl")
    cfg = config_from_mapping(job.config_type, {
        "model": str(tiny_chat_llama_dir), "reward": "length", "transform": "exp", "t": 4.0,
        "save_every": 1, "train_prompts": 4, "prompts_per_step": 4, "samples_per_prompt": 2,
        "pool_size": 4, "max_new_tokens": 8, "learning_rate": 1e-3, "target_kl": 1.0,
        "steps": STEPS})
    record = RunRecord(in_tmp / "done", "ctrl", cfg, collect_environment=False)
    record.set_metrics({"step": STEPS, "loss": 0.5, "kl": 0.1})
    record.add_checkpoint(STEPS)
    record.finish("ok")
    return in_tmp / "done"


def _cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- 1, 2, 3: resume continues the recorded run, refusals leave the record byte-identical -------


def test_resume_of_a_finished_run_with_nothing_to_do_is_a_noop(capsys, finished_record):
    before = _digest(finished_record / MANIFEST)
    code, _, err = _cli(capsys, "ctrl", "--run-dir", finished_record, "--resume")
    assert code == 0
    _one_line(err, "already finished", "nothing to do", "--steps")
    assert _digest(finished_record / MANIFEST) == before
    assert sorted(p.name for p in finished_record.iterdir()) == [MANIFEST]


@pytest.mark.parametrize("flags, named", [
    (["--keep-last", "0"], ["--keep-last recorded 2, now 0"]),
    (["--reward", "vader", "--max-new-tokens", "16"],
     ["--reward recorded 'length', now 'vader'", "--max-new-tokens recorded 8, now 16"]),
    (["--steps", "2"], ["--steps 2 is below the 4 steps", "can only grow"]),
    (["--config", "more.yaml"], ["--learning-rate recorded 0.001, now 0.5"]),
])
def test_resume_refuses_changed_settings_naming_each(capsys, finished_record, flags, named):
    (finished_record.parent / "more.yaml").write_text("learning_rate: 0.5\n")
    before = _digest(finished_record / MANIFEST)
    code, _, err = _cli(capsys, "ctrl", "--run-dir", finished_record, "--resume", *flags)
    assert code == 2
    _one_line(err, *named)
    assert _digest(finished_record / MANIFEST) == before


def test_more_steps_are_refused_where_the_schedule_spans_the_steps(capsys, finished_record):
    record = json.loads((finished_record / MANIFEST).read_text())
    record["config"]["lr_schedule"] = "cosine"
    (finished_record / MANIFEST).write_text(json.dumps(record))
    before = _digest(finished_record / MANIFEST)
    code, _, err = _cli(capsys, "ctrl", "--run-dir", finished_record, "--resume", "--steps", "6")
    assert code == 2
    _one_line(err, "--steps recorded 4, now 6")
    assert _digest(finished_record / MANIFEST) == before


def test_resume_takes_the_config_from_the_record(capsys, finished_record, monkeypatch):
    from iapo_jax.commands import ctrl

    seen = {}

    def fake_run(cfg):  # the job itself is exercised by the slow rows below
        seen["cfg"] = cfg
        return {"step": cfg.steps}

    monkeypatch.setattr(ctrl, "JOB", dataclasses.replace(ctrl.JOB, run=fake_run))
    code, _, err = _cli(capsys, "ctrl", "--run-dir", finished_record, "--resume", "--steps", "6")
    assert code == 0, err
    assert seen["cfg"].reward == "length" and seen["cfg"].max_new_tokens == 8
    assert seen["cfg"].steps == 6
    record = load_record(finished_record)
    assert record["config"]["reward"] == "length" and record["config"]["steps"] == 6
    assert record["extra"]["attempts"][0]["status"] == "ok"


def test_a_resume_that_fails_before_new_state_leaves_the_record_untouched(
        capsys, finished_record, monkeypatch):
    from iapo_jax.commands import ctrl

    def broken(cfg):
        from iapo_jax.commands.common import current_context

        current_context().log(STEPS + 1, loss=1.0)  # it got somewhere, but saved nothing new
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ctrl, "JOB", dataclasses.replace(ctrl.JOB, run=broken))
    before = _digest(finished_record / MANIFEST)
    code, _, err = _cli(capsys, "ctrl", "--run-dir", finished_record, "--resume", "--steps", "6")
    assert code == 1 and "disk on fire" in err
    assert _digest(finished_record / MANIFEST) == before


def test_a_bad_value_on_resume_is_refused_before_anything_runs(capsys, finished_record):
    before = _digest(finished_record / MANIFEST)
    code, _, err = _cli(capsys, "ctrl", "--run-dir", finished_record, "--resume", "--steps", "x")
    assert code == 2
    _one_line(err, "--steps")
    assert _digest(finished_record / MANIFEST) == before


# -- 4: only jobs that checkpoint resume (the parser rows are in test_cli) ----------------------


def test_generate_resume_on_a_finished_run_is_refused_untouched(capsys, finished_record):
    before = _digest(finished_record / MANIFEST)
    code, _, err = _cli(capsys, "generate", "--run-dir", finished_record, "--resume")
    assert code == 2
    _one_line(err, "no --resume")
    assert _digest(finished_record / MANIFEST) == before


# -- 5: a folder that is not an empty run directory --------------------------------------------


def test_ctrl_refuses_a_folder_with_files_and_touches_nothing(capsys, in_tmp, tiny_chat_llama_dir):
    mine = in_tmp / "mine"
    mine.mkdir()
    (mine / "samples.jsonl").write_text("precious\n")
    code, _, err = _cli(capsys, "ctrl", "--model", tiny_chat_llama_dir, *CTRL_ARGS,
                        "--run-dir", mine)
    assert code == 2
    _one_line(err, "mine", "not empty", "new or empty folder")
    assert sorted(p.name for p in mine.iterdir()) == ["samples.jsonl"]
    assert (mine / "samples.jsonl").read_text() == "precious\n"


# -- 8: checks that need no model run before one loads ------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--save-every", "-1"], ["--save-every", "at least 1"]),
    (["--keep-last", "0"], ["--keep-last", "at least 1"]),
    (["--train-prompts", "0"], ["--train-prompts", "at least 1"]),
    (["--pool-size", "0"], ["--pool-size", "at least 2"]),
    (["--reward", "nope"], ["unknown reward 'nope'"]),
    (["--model", "no/such/model"], ["no/such/model"]),
])
def test_ctrl_flags_are_checked_before_the_model_loads(capsys, in_tmp, tiny_chat_llama_dir,
                                                       monkeypatch, flags, words):
    import iapo_jax

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(iapo_jax, "load_model", no_loading)
    code, _, err = _cli(capsys, "ctrl", "--model", tiny_chat_llama_dir, *CTRL_ARGS, *flags,
                        "--run-dir", "r")
    assert code == 2
    _one_line(err, *words)
    assert not (in_tmp / "r").exists()


def _pool(directory, **meta):
    from iapo_jax.commands.calibrate import CalibrateConfig, pool_meta
    from iapo_jax.rewards.calibration import ReferencePool

    base = pool_meta(CalibrateConfig(reward="length", max_new_tokens=8), "smollm2-135m-instruct",
                     {})
    base.pop("model")
    base.update(meta)
    ReferencePool.build(["hi", "ho"], [[0.1, 0.2], [0.3, 0.4]], meta=base).save(directory)
    return directory


@pytest.mark.parametrize("meta, words", [
    ({"reward": "vader"}, ["reward 'vader'", "'length'", "iapo calibrate"]),
    ({"max_new_tokens": 32}, ["max new tokens 32", "this run uses 8"]),
    ({"temperature": 0.7}, ["temperature 0.7", "1.0"]),
    ({"model": "another-model"}, ["sampled from model 'another-model'"]),
])
def test_ctrl_refuses_a_pool_built_with_other_settings(capsys, in_tmp, tiny_chat_llama_dir,
                                                       monkeypatch, meta, words):
    import iapo_jax

    monkeypatch.setattr(iapo_jax, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    pool = _pool(in_tmp / "pool", **meta)
    code, _, err = _cli(capsys, "ctrl", "--model", tiny_chat_llama_dir, *CTRL_ARGS,
                        "--pool-dir", pool, "--run-dir", "r")
    assert code == 2
    _one_line(err, "--pool-dir", *words)
    assert not (in_tmp / "r").exists()


def test_ctrl_accepts_a_pool_built_with_its_settings(in_tmp, tiny_chat_llama_dir):
    from iapo_jax.commands.ctrl import CtrlJobConfig, check_pool
    from iapo_jax.rewards.calibration import ReferencePool

    pool = ReferencePool.load(_pool(in_tmp / "pool", model=str(tiny_chat_llama_dir)))
    check_pool(CtrlJobConfig(model=str(tiny_chat_llama_dir), reward="length", max_new_tokens=8),
               pool.meta, "pool")


# -- 9: checkpoint damage: one readable line each, and the fix when nothing is left ------------


def _saved(directory, steps):
    import jax.numpy as jnp

    from iapo_jax.runtime.checkpointing import Checkpointer

    states = {s: {"w": jnp.full((64,), float(s))} for s in steps}
    with Checkpointer(directory, handle_sigterm=False) as ckpt:
        for step, state in states.items():
            ckpt.save(step, model=state)
    return states


def _damage(step_dir):
    for root, _, files in os.walk(step_dir / "model"):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_fallback_and_all_corrupt_messages_are_one_readable_line(tmp_path):
    from iapo_jax.runtime.checkpointing import (
        CheckpointFallbackWarning,
        Checkpointer,
        NoCheckpointError,
    )

    states = _saved(tmp_path, (1, 2))
    _damage(tmp_path / "2")
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = ckpt.restore(model=_abstract(states[1]))
    assert restored.step == 1
    (warning,) = [w for w in caught if issubclass(w.category, CheckpointFallbackWarning)]
    text = str(warning.message)
    assert "\n" not in text and len(text) < 300, text
    assert "step 2" in text and "falling back to step 1" in text
    assert "tensorstore" not in text.lower() and "{" not in text, text

    _damage(tmp_path / "1")
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(NoCheckpointError) as err:
                ckpt.restore(model=_abstract(states[1]))
    text = str(err.value)
    assert "\n" not in text and len(text) < 400, text
    assert "steps 2, 1" in text and "new --run-dir" in text and "without --resume" in text


# -- 10: SIGKILL at random points during checkpoint saves (a small loop, several seeds) ----------


KILL_SCRIPT = textwrap.dedent(
    '''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from iapo_jax.runtime.checkpointing import Checkpointer

    def train(directory, steps, resume):
        # Big enough that each asynchronous save takes a while; the update is a function of the
        # step, so an exact resume gives the uninterrupted values bit for bit.
        state, start = {"w": jnp.zeros((512, 512)), "b": jnp.zeros(())}, 0
        ckpt = Checkpointer(directory, keep_last=2, handle_sigterm=False, async_save=True)
        if resume and ckpt.latest_step() is not None:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
            r = ckpt.restore(model=abstract)
            state, start = r.model, r.step + 1
        for step in range(start, steps):
            state = jax.tree.map(lambda a: a * 0.5 + jnp.sin(step + 1.0), state)
            print(f"saving {step}", flush=True)
            ckpt.save(step, model=state, data_position=step)
        ckpt.close()
        return state

    if __name__ == "__main__":
        train(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume")
    '''
)
KILL_STEPS = 8


@pytest.fixture(scope="module")
def kill_loop(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill") / "kill_loop.py"
    path.write_text(KILL_SCRIPT)
    namespace = {"__name__": "kill_loop"}
    exec(compile(KILL_SCRIPT, str(path), "exec"), namespace)
    reference = namespace["train"](str(path.parent / "uninterrupted"), KILL_STEPS, False)
    return path, namespace["train"], reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sigkill_during_a_save_leaves_valid_checkpoints_and_an_exact_resume(kill_loop, tmp_path,
                                                                            seed):
    import numpy as np

    from iapo_jax.runtime.checkpointing import Checkpointer

    script, train, reference = kill_loop
    rng = random.Random(seed)
    kill_after, delay = rng.randint(1, KILL_STEPS - 2), rng.uniform(0.0, 0.15)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(KILL_STEPS), "fresh"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if line.strip() == f"saving {kill_after}":
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    # Every step orbax lists restores, and a resume reaches the uninterrupted values exactly.
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        for step in ckpt.all_steps():
            abstract = _abstract({"w": reference["w"], "b": reference["b"]})
            ckpt.restore(model=abstract, step=step)
    resumed = train(str(tmp_path), KILL_STEPS, True)
    for key in reference:
        np.testing.assert_array_equal(np.asarray(resumed[key]), np.asarray(reference[key]))
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


# ----------------------------------------------------------------------------------------------
# The real job: `iapo ctrl` on the tiny chat model, through the CLI in child processes.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tiny_chat_llama_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ctrl") / "full"
    done = _run(_ctrl(tiny_chat_llama_dir, run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _start(model, run_dir):
    return subprocess.Popen(_ctrl(model, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def _wait_for(proc, condition, timeout=600):
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


@pytest.mark.slow
def test_two_sigterms_preempt_cleanly_then_resume_matches_and_reproduces(
        tiny_chat_llama_dir, tmp_path, uninterrupted):
    run = tmp_path / "preempted"
    proc = _start(tiny_chat_llama_dir, run)
    _wait_for(proc, lambda: (run / "checkpoints" / "1").exists())
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as `timeout` wrappers do: must not cut the final save
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
    assert f"--run-dir {run} --resume" in err.splitlines()[-1]
    record = _assert_valid(run, status="preempted")
    assert record["checkpoints"] and max(record["checkpoints"]) < STEPS
    assert max(_checkpoint_steps(run)) == max(record["checkpoints"])

    resumed = _run(_resume(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stderr
    _assert_valid(run, status="ok")
    _assert_same_run(uninterrupted, run)

    again = _run([sys.executable, "-m", "iapo_jax.cli", "reproduce", str(run),
                  "--run-dir", str(tmp_path / "again")])
    assert again.returncode == 0, again.stderr[-3000:]
    checks = load_record(tmp_path / "again")["extra"]["reproduction"]
    assert checks["mismatches"] == 0 and checks["checks"] > 20


@pytest.mark.slow
def test_sigterm_before_the_first_checkpoint_records_preempted(tiny_chat_llama_dir, tmp_path):
    run = tmp_path / "early"
    proc = _start(tiny_chat_llama_dir, run)
    _wait_for(proc, lambda: (run / MANIFEST).exists())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
    assert "--resume" in err.splitlines()[-1]
    _assert_valid(run, status="preempted")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_during_a_ctrl_save_then_resume_matches(tiny_chat_llama_dir, tmp_path,
                                                        uninterrupted, seed):
    rng = random.Random(seed)
    step, delay = rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.05)
    run = tmp_path / "killed"
    proc = _start(tiny_chat_llama_dir, run)
    saving = lambda: any(p.name.startswith(f"{step}.") or p.name == str(step)  # noqa: E731
                         for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else False
    _wait_for(proc, saving)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    record = json.loads((run / MANIFEST).read_text())  # whole, never torn
    assert record["status"] == "running"  # killed mid-run: only SIGKILL can leave it so
    _assert_valid(run)

    resumed = _run(_resume(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_valid(run, status="ok")
    _assert_same_run(uninterrupted, run)


@pytest.mark.slow
def test_more_steps_on_a_finished_run_continue_it_past_a_corrupt_latest(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "more"
    shutil.copytree(uninterrupted, run)
    before = load_record(run)
    _damage(run / "checkpoints" / str(STEPS))
    done = _run(_resume(run, "--steps", str(STEPS + 1)))
    assert done.returncode == 0, done.stderr[-3000:]
    (warning,) = [line for line in done.stderr.splitlines() if "unreadable" in line]
    assert warning.startswith("iapo ctrl: warning: checkpoint step 4") and "step 3" in warning
    assert f"resumed at step {STEPS - 1}" in done.stderr
    after = _assert_valid(run, status="ok")
    assert after["metrics"]["step"] == STEPS + 1
    assert set(after["metrics"]) == set(before["metrics"])  # every metric, not just {step, t}
    assert after["config"]["steps"] == STEPS + 1 and after["config"]["reward"] == "length"


@pytest.mark.slow
def test_reproduce_notices_replaced_model_weights(tiny_chat_llama_dir, tmp_path, uninterrupted):
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_llama_dir, model)
    run = tmp_path / "run"
    done = _run(_ctrl(model, run, steps=1))
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = (weights[name] + np.float32(1e-3)).astype(weights[name].dtype)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    again = _run([sys.executable, "-m", "iapo_jax.cli", "reproduce", str(run),
                  "--run-dir", str(tmp_path / "again")])
    assert again.returncode == cli.EXIT_MISMATCH
    assert "first: fingerprint model (input)" in again.stderr.splitlines()[-1]
