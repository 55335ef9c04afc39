"""`iapo runs` (the table of run records and --compare), --resume --allow-changes, and progress
(--quiet, periodic lines in logs). Runs are real `iapo env` runs (a seeded sharded least-squares
fit, a second each) and a ctrl record written by RunRecord, all in-process through ``cli.main``.
"""

import dataclasses
import io
import json

import pytest

from iapo_jax import cli
from iapo_jax.runtime.manifest import MANIFEST, RunRecord, load_record
from iapo_jax.runtime.progress import LogProgress, progress_mode, quiet_progress


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def two_env_runs(capsys, in_tmp):
    for name, lr in (("a", "0.1"), ("b", "0.05")):
        code, _, err = run_cli(capsys, "env", "--steps", "3", "--lr", lr, "--run-dir", f"runs/{name}")
        assert code == 0, err
    return in_tmp / "runs" / "a", in_tmp / "runs" / "b"


def _row(out, run):
    rows = [line for line in out.splitlines() if line.split()[:1] == [run]]
    assert len(rows) == 1, out
    return rows[0]


def test_runs_lists_every_record_with_settings_metrics_and_commit(capsys, in_tmp, two_env_runs):
    a, _ = two_env_runs
    nested = RunRecord(in_tmp / "runs" / "sweep" / "c", "ctrl", None, collect_environment=False)
    nested.data["config"] = {"model": "/models/tiny-llama", "transform": "exp", "procedure": "bon",
                             "deploy_n": 4, "steps": 7, "learning_rate": 1e-3, "seed": 0}
    nested.set_metrics({"step": 7, "kl": 0.25, "loss": 0.5})
    nested.finish("preempted")
    (in_tmp / "runs" / "sweep" / "c" / "checkpoints" / "7").mkdir(parents=True)
    (in_tmp / "runs" / "sweep" / "c" / "checkpoints" / "7" / MANIFEST).write_text("{}")  # not a run
    (in_tmp / "runs" / "broken").mkdir()
    (in_tmp / "runs" / "broken" / MANIFEST).write_text("{not json")

    code, out, err = run_cli(capsys, "runs")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["run", "job", "date", "status", "settings", "metrics", "commit"]
    record = load_record(a)
    row_a = _row(out, "a")
    assert "env" in row_a and " ok " in row_a and "lr=0.1" in row_a and "steps=3" in row_a
    assert f"final_loss={record['metrics']['final_loss']:.4g}" in row_a
    assert record["started"][:10] in row_a
    git = record["code"]["git"]
    if git.get("commit"):
        assert git["commit"][:10] + ("+" if git.get("dirty") else "") in row_a.split()[-1]
    assert "lr=0.05" in _row(out, "b")
    row_c = _row(out, "sweep/c")
    assert "preempted" in row_c and "model=tiny-llama" in row_c and "deploy_n=4" in row_c
    assert "kl=0.25" in row_c and row_c.rstrip().endswith("-")  # no code version recorded
    assert "checkpoints" not in out
    assert "1 folder(s) with an unreadable manifest.json skipped" in err and "broken" in err
    assert not (in_tmp / "runs" / "runs").exists()  # listing writes no record of its own

    code, out, _ = run_cli(capsys, "runs", in_tmp / "runs" / "sweep")
    assert code == 0 and "c " in out and "env" not in out


def test_runs_on_an_empty_folder_says_so(capsys, in_tmp):
    (in_tmp / "empty").mkdir()
    code, out, err = run_cli(capsys, "runs", "empty")
    assert code == 0 and out == "" and "no run records under empty" in err


def test_compare_shows_only_what_differs(capsys, two_env_runs):
    a, b = two_env_runs
    code, out, err = run_cli(capsys, "runs", "--compare", a, b)
    assert code == 0, err
    ra, rb = load_record(a), load_record(b)
    settings = [line.split() for line in out.split("\n\n")[1].splitlines()[2:]]
    assert settings == [["lr", "0.1", "0.05"]]  # the only setting that differs
    metric_rows = {line.split()[0]: line.split() for line in out.split("\n\n")[2].splitlines()[2:]}
    fa, fb = ra["metrics"]["final_loss"], rb["metrics"]["final_loss"]
    assert fa != fb
    assert metric_rows["final_loss"] == ["final_loss", f"{fa:.4g}", f"{fb:.4g}", f"{fb - fa:.4g}"]

    code, out, _ = run_cli(capsys, "runs", "--compare", a, a)
    assert code == 0 and "settings: the same" in out and "final metrics: the same" in out


def _ctrl_record(run_dir, steps=4):
    from iapo_jax.commands import load_job
    from iapo_jax.commands.configs import config_from_mapping

    cfg = config_from_mapping(load_job("ctrl").config_type, {
        "model": "tiny", "reward": "length", "learning_rate": 1e-3, "steps": steps})
    record = RunRecord(run_dir, "ctrl", cfg, collect_environment=False)
    record.set_metrics({"step": steps, "loss": 0.5})
    record.add_checkpoint(steps)
    record.finish("ok")
    return run_dir


def test_resume_with_changed_settings_refuses_unless_allowed_and_records_it(
        capsys, in_tmp, monkeypatch):
    from iapo_jax.commands import ctrl

    run_dir = _ctrl_record(in_tmp / "done")
    before = (run_dir / MANIFEST).read_bytes()
    seen = {}

    def fake_run(cfg):  # the trainer's resume is tested in test_fault_injection
        seen["cfg"] = cfg
        return {"step": cfg.steps}

    monkeypatch.setattr(ctrl, "JOB", dataclasses.replace(ctrl.JOB, run=fake_run))
    args = ("ctrl", "--run-dir", run_dir, "--resume", "--learning-rate", "2e-3", "--max-new-tokens", "16")
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--learning-rate recorded 0.001, now 0.002" in err and "--max-new-tokens recorded 32, now 16" in err
    assert "--allow-changes" in err and "cfg" not in seen
    assert (run_dir / MANIFEST).read_bytes() == before

    code, _, err = run_cli(capsys, *args, "--allow-changes")
    assert code == 0, err
    assert seen["cfg"].learning_rate == 2e-3 and seen["cfg"].max_new_tokens == 16
    record = load_record(run_dir)
    assert record["config"]["learning_rate"] == 2e-3
    assert record["extra"]["allowed_changes"] == [{"from_checkpoint": 4, "changes": {
        "learning_rate": {"recorded": 1e-3, "now": 2e-3},
        "max_new_tokens": {"recorded": 32, "now": 16}}}]

    # a later resume keeps the note; a safe change alone (more steps) adds nothing to it
    code, _, err = run_cli(capsys, "ctrl", "--run-dir", run_dir, "--resume", "--steps", "6")
    assert code == 0, err
    assert len(load_record(run_dir)["extra"]["allowed_changes"]) == 1


def test_progress_lines_in_logs_and_quiet_silences_them(capsys, in_tmp, monkeypatch):
    monkeypatch.setenv("IAPO_PROGRESS_SECONDS", "0")  # a line on every step
    assert progress_mode() == "lines"  # pytest's stderr is no terminal
    with quiet_progress():
        assert progress_mode() == "off"
    assert progress_mode() == "lines"

    code, _, err = run_cli(capsys, "env", "--steps", "3", "--run-dir", "loud")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("env: ") and " step" in line]
    assert len(lines) == 4, err  # one per step, then the last one
    assert lines[0].startswith("env: 1/3 step (33%)") and "left" in lines[0], err
    assert lines[-1].startswith("env: 3/3 step (100%), done in"), err

    code, _, err = run_cli(capsys, "env", "--steps", "3", "--quiet", "--run-dir", "quiet")
    assert code == 0, err
    assert not [line for line in err.splitlines() if " step" in line], err
    assert "done in" in err  # the summary still prints
    assert progress_mode() == "lines"  # --quiet ends with its run
    assert json.loads((in_tmp / "quiet" / MANIFEST).read_text())["status"] == "ok"


def test_log_progress_counts_rate_and_time_left():
    clock = iter([0.0, 10.0, 20.0, 40.0]).__next__  # start, then one reading per update/close
    import iapo_jax.runtime.progress as progress_module

    out = io.StringIO()
    original = progress_module.time.monotonic
    progress_module.time.monotonic = clock
    try:
        bar = LogProgress(total=5, desc="train", unit="step", initial=1, interval=5, file=out)
        bar.update(1)   # t=10: 2/5, 10 s per step since the start, 3 left
        bar.update(1)   # t=20: 3/5
        bar.close()     # t=40
    finally:
        progress_module.time.monotonic = original
    assert out.getvalue().splitlines() == [
        "train: 2/5 step (40%), 10 s/step, 30 s left",
        "train: 3/5 step (60%), 10 s/step, 20 s left",
        "train: 3/5 step (60%), done in 40 s",
    ]
