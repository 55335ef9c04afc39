"""The `iapo` front door: help, exit codes, one-line user errors, YAML configs, reproduce round trip.

Jobs run in-process through ``cli.main`` (the `env` job: a seeded sharded least-squares fit), so the
whole file takes seconds. One test starts a real interpreter to check `iapo --help` stays light.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

from iapo_jax import cli
from iapo_jax.runtime.manifest import MANIFEST, load_record
from iapo_jax.runtime.metrics import read_metrics


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_top_level_help_lists_every_job(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for job in ("quickstart", "train-rm", "calibrate", "train-scorer", "ctrl", "generate", "eval",
                "theory", "bench", "reproduce", "env"):
        assert f"  {job} " in out
    assert "--run-dir" in out and "--config" in out and "exit codes" in out


def test_top_level_help_does_not_import_jax():
    code = "import sys; from iapo_jax.cli import main; main(['--help']); print('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("False")


def test_job_help_documents_job_and_common_options(capsys):
    code, out, _ = run_cli(capsys, "env", "--help")
    assert code == 0
    for flag in ("--seed", "--steps", "--lr", "--config", "--run-dir", "--coordinator", "75"):
        assert flag in out
    assert "--resume" not in out  # env saves no checkpoints


@pytest.mark.parametrize("job, has_resume, has_coordinator", [
    ("ctrl", True, True), ("train-rm", True, True), ("train-scorer", True, True),
    ("generate", False, True), ("eval", False, True), ("calibrate", False, True),
    ("theory", False, False), ("bench", False, False),
])
def test_only_jobs_that_checkpoint_list_resume(capsys, job, has_resume, has_coordinator):
    code, out, _ = run_cli(capsys, job, "--help")
    assert code == 0
    assert ("--resume" in out) == has_resume
    assert ("--coordinator" in out) == has_coordinator
    if has_resume:
        assert "75" in out and "--resume" in out


@pytest.mark.parametrize("args, words", [
    (["generate", "--resume", "--run-dir", "r"], ["iapo generate", "no --resume", "new --run-dir"]),
    (["theory", "--resume", "--run-dir", "r"], ["iapo theory", "no --resume"]),
    (["env", "--resume", "--run-dir", "r"], ["iapo env", "no --resume"]),
    (["reproduce", "x", "--resume", "--run-dir", "r"], ["no --resume"]),
    (["theory", "--coordinator", "h:1"], ["single process", "--coordinator"]),
    (["bench", "--num-processes", "2"], ["single process", "--num-processes"]),
])
def test_jobs_refuse_options_they_do_not_take(capsys, in_tmp, args, words):
    (in_tmp / "r").mkdir()
    (in_tmp / "r" / "samples.jsonl").write_text("mine\n")
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, *words)
    assert (in_tmp / "r" / "samples.jsonl").read_text() == "mine\n"


@pytest.mark.parametrize(
    "args, words",
    [
        (["env", "--bogus", "3"], ["iapo env", "--bogus", "--help"]),
        (["env", "--steps", "abc"], ["--steps", "abc"]),
        (["env", "--config", "missing.yaml"], ["missing.yaml", "not found"]),
        (["env", "--run-dir"], ["--run-dir"]),
        (["nojob"], ["unknown job 'nojob'"]),
        (["reproduce", "not-a-run"], ["not-a-run", "does not exist"]),
        (["ctrl", "--resume", "--run-dir", "empty"], ["no manifest.json"]),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, in_tmp, args, words):
    (in_tmp / "empty").mkdir()
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, *words)


def test_input_rejected_by_the_job_leaves_no_run_directory(capsys, in_tmp):
    code, _, err = run_cli(capsys, "env", "--data", "3", "--run-dir", "bad")
    assert code == 2
    assert_one_line_error(err, "data=3", "8 are available")
    assert not (in_tmp / "bad").exists()


def test_bad_yaml_key_and_type_are_one_line_errors(capsys, in_tmp):
    (in_tmp / "typo.yaml").write_text("stepz: 3\n")
    code, _, err = run_cli(capsys, "env", "--config", "typo.yaml")
    assert code == 2
    assert_one_line_error(err, "stepz", "valid options", "steps")
    (in_tmp / "type.yaml").write_text("steps: many\n")
    code, _, err = run_cli(capsys, "env", "--config", "type.yaml")
    assert code == 2
    assert_one_line_error(err, "'steps' expects an integer", "many")


def test_yaml_values_are_defaults_and_flags_override(capsys, in_tmp):
    (in_tmp / "cfg.yaml").write_text("steps: 2\nlr: 0.05\nbatch: 32\n")
    code, _, err = run_cli(capsys, "env", "--config", "cfg.yaml", "--steps", "3", "--run-dir", "r1")
    assert code == 0, err
    record = load_record(in_tmp / "r1")
    assert record["config"]["steps"] == 3 and record["config"]["lr"] == 0.05
    assert record["config"]["batch"] == 32
    assert record["seeds"] == {"seed": 0}
    assert record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert [row["step"] for row in read_metrics(in_tmp / "r1")] == [0, 1, 2]
    assert "final_loss" in err  # the summary table goes to stderr


def test_default_run_dir_and_refusing_to_overwrite(capsys, in_tmp):
    code, _, _ = run_cli(capsys, "env", "--steps", "1")
    assert code == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    assert run_dir.name.startswith("env-") and (run_dir / MANIFEST).is_file()
    code, _, err = run_cli(capsys, "env", "--run-dir", str(run_dir))
    assert code == 2
    assert_one_line_error(err, "already holds a run", "new --run-dir")
    assert "--resume" not in err  # env cannot resume


@pytest.mark.parametrize("job_args", [["env", "--steps", "1"], ["theory", "--kl", "1"]])
def test_a_folder_that_is_not_an_empty_run_directory_is_refused_untouched(capsys, in_tmp, job_args):
    mine = in_tmp / "mine"
    mine.mkdir()
    (mine / "samples.jsonl").write_text("my own samples\n")
    (mine / "metrics.jsonl").write_text("{}\n")
    before = sorted((p.name, p.read_bytes()) for p in mine.iterdir())
    code, _, err = run_cli(capsys, *job_args, "--run-dir", "mine")
    assert code == 2
    assert_one_line_error(err, "mine", "not empty", "new or empty folder")
    assert sorted((p.name, p.read_bytes()) for p in mine.iterdir()) == before
    (in_tmp / "afile").write_text("x")
    code, _, err = run_cli(capsys, *job_args, "--run-dir", "afile")
    assert code == 2
    assert_one_line_error(err, "afile", "is a file")
    assert (in_tmp / "afile").read_text() == "x"
    (in_tmp / "empty").mkdir()
    code, _, err = run_cli(capsys, *job_args, "--run-dir", "empty")
    assert code == 0, err
    assert (in_tmp / "empty" / MANIFEST).is_file()


@pytest.mark.parametrize("args, words", [
    (["bench", "--json", "."], ["--json", "is a folder"]),
    (["bench", "--markdown", "afile/out.md"], ["--markdown", "afile is a file"]),
    (["theory", "--kl", "1", "--plot", "afile/p.png"], ["--plot", "afile is a file"]),
])
def test_output_paths_are_checked_before_any_compute(capsys, in_tmp, args, words):
    (in_tmp / "afile").write_text("x")
    code, _, err = run_cli(capsys, *args, "--run-dir", "out")
    assert code == 2
    assert_one_line_error(err, *words)
    assert not (in_tmp / "out").exists()


def test_internal_errors_exit_1_and_are_recorded(capsys, in_tmp, monkeypatch):
    from iapo_jax.commands import env

    def broken(cfg):
        raise RuntimeError("kaput")

    monkeypatch.setattr(env, "JOB", dataclasses.replace(env.JOB, run=broken))
    code, _, err = run_cli(capsys, "env", "--run-dir", "broken")
    assert code == 1
    assert "Traceback" in err and "kaput" in err
    record = load_record(in_tmp / "broken")
    assert record["status"] == "failed" and record["error"]["message"] == "kaput"


def test_reproduce_round_trip_and_mismatch(capsys, in_tmp):
    code, _, err = run_cli(capsys, "env", "--steps", "3", "--seed", "5", "--run-dir", "orig")
    assert code == 0, err
    original = load_record(in_tmp / "orig")

    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "again")
    assert code == 0, err
    rerun = load_record(in_tmp / "again")
    assert rerun["job"] == "env" and rerun["config"] == original["config"]
    assert rerun["metrics"] == original["metrics"]  # same machine: exact
    assert rerun["extra"]["reproduces"] == "orig"
    assert rerun["extra"]["reproduction"]["mismatches"] == 0
    # 2 final metrics + the loss series + fingerprints of the synthetic data (read) and weights (made)
    assert rerun["extra"]["reproduction"]["checks"] == 5
    assert rerun["fingerprints"]["weights"]["role"] == "output"
    assert "exact" in err and "MISMATCH" not in err

    # Tamper with the record: the rerun must now disagree and exit 3.
    original["metrics"]["final_loss"] *= 1.0 + 1e-6
    (in_tmp / "orig" / MANIFEST).write_text(json.dumps(original))
    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "third")
    assert code == 3
    assert "MISMATCH" in err and "1 of 5 checks differ" in err and "first: final_loss" in err
    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "fourth", "--ignore", "final_*")
    assert code == 0, err
    assert load_record(in_tmp / "fourth")["extra"]["reproduction"]["checks"] == 4

    # Other output with the same numbers (a changed weights file): named, even though every
    # metric matches.
    original["metrics"]["final_loss"] = rerun["metrics"]["final_loss"]
    original["fingerprints"]["weights"]["sha256"] = "0" * 64
    (in_tmp / "orig" / MANIFEST).write_text(json.dumps(original))
    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "fifth")
    assert code == 3
    assert "1 of 5 checks differ" in err and "first: fingerprint weights (output)" in err


def test_reproduce_names_the_first_diverging_step(capsys, in_tmp):
    code, _, err = run_cli(capsys, "env", "--steps", "4", "--run-dir", "orig")
    assert code == 0, err
    lines = (in_tmp / "orig" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows[2:]:
        row["loss"] += 1.0
    (in_tmp / "orig" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "again")
    assert code == 3
    assert "diverges at step 2 (loss)" in err
    step = load_record(in_tmp / "again")["extra"]["reproduction"]["first_diverging_step"]
    assert step == {"step": 2, "metric": "loss"}


def test_reproduce_across_machines_uses_the_tolerance(capsys, in_tmp):
    code, _, _ = run_cli(capsys, "env", "--steps", "2", "--run-dir", "orig")
    assert code == 0
    original = load_record(in_tmp / "orig")
    original["jax"]["device_count"] = 4  # pretend it was recorded elsewhere
    original["metrics"]["final_loss"] *= 1.0 + 1e-6
    (in_tmp / "orig" / MANIFEST).write_text(json.dumps(original))
    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "b", "--rtol", "1e-5")
    assert code == 0, err
    assert "rtol=1e-05" in err
    code, _, err = run_cli(capsys, "reproduce", "orig", "--run-dir", "c", "--rtol", "1e-7")
    assert code == 3


def test_unfinished_runs_are_not_reproduced(capsys, in_tmp):
    run_cli(capsys, "env", "--steps", "1", "--run-dir", "orig")
    record = load_record(in_tmp / "orig")
    record["status"] = "failed"
    (in_tmp / "orig" / MANIFEST).write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "reproduce", "orig")
    assert code == 2
    assert_one_line_error(err, "status 'failed'")
