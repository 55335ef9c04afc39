"""Run records, metrics files and summary tables.

Independent references: hashlib for fingerprints, the git CLI for commits, TensorBoard's Event
protobuf (decoded from the raw TFRecord framing) for event files.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from iapo_jax.runtime import environment
from iapo_jax.runtime.jsonable import flatten_scalars, same_number, to_jsonable
from iapo_jax.runtime.manifest import MANIFEST, MissingRecordError, RunRecord, load_record
from iapo_jax.runtime.metrics import MetricsWriter, read_metrics
from iapo_jax.runtime.progress import format_table, progress


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 4
    path: Path = Path("data/x.txt")


@dataclasses.dataclass(frozen=True)
class Cfg:
    seed: int = 3
    lr: float = 1e-3
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = Inner()


def test_record_holds_everything_needed_to_rerun(tmp_path):
    data_file = tmp_path / "prompts.txt"
    data_file.write_bytes(b"hello\nworld\n")
    record = RunRecord(tmp_path / "run", job="demo", config=Cfg(), argv=["iapo", "demo", "--lr", "1e-3"])
    record.add_seed("seed", 3)
    record.set_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    record.add_data("prompts", path=data_file, rows=2)
    record.add_data("scores", "ab" * 32)
    record.add_checkpoint(10)
    record.add_checkpoint(10)
    record.add_checkpoint(20)
    record.set_metrics({"win_rate": np.float32(0.625), "curve": [1.0, 2.0], "name": "text"})
    with record.timer("calibrate"):
        pass
    record.finish("ok")

    data = load_record(tmp_path / "run")
    assert data["job"] == "demo" and data["status"] == "ok" and data["finished"]
    assert data["config"] == {"seed": 3, "lr": 1e-3, "sizes": [1, 2], "inner": {"width": 4, "path": "data/x.txt"}}
    assert data["config_type"].endswith("test_manifest.Cfg")
    assert data["command"]["argv"] == ["iapo", "demo", "--lr", "1e-3"]
    assert data["seeds"] == {"seed": 3}
    assert data["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert data["data"]["prompts"]["sha256"] == hashlib.sha256(b"hello\nworld\n").hexdigest()
    assert data["data"]["prompts"]["rows"] == 2
    assert data["data"]["scores"]["sha256"] == "ab" * 32
    assert data["checkpoints"] == [10, 20]
    assert data["metrics"] == {"win_rate": 0.625, "curve[0]": 1.0, "curve[1]": 2.0}
    assert set(data["timings"]) == {"calibrate", "total"}
    # environment facts
    assert data["jax"]["device_count"] == len(jax.devices()) == 8
    assert data["jax"]["backend"] == "cpu" and data["jax"]["process_count"] == 1
    assert data["packages"]["jax"] == jax.__version__
    assert data["python"]["version"].count(".") == 2
    assert data["host"]["hostname"] and data["host"]["cpu_count"] >= 1
    assert len(data["code"]["source_sha256"]) == 64
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())


def test_failed_run_keeps_the_error_and_traceback(tmp_path):
    record = RunRecord(tmp_path, job="demo", collect_environment=False)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        record.finish("failed", error=err)
    data = load_record(tmp_path)
    assert data["status"] == "failed"
    assert data["error"]["type"] == "RuntimeError" and "boom" in data["error"]["traceback"]


def test_writes_are_atomic(tmp_path):
    record = RunRecord(tmp_path, job="demo", collect_environment=False)
    record.write()
    before = (tmp_path / MANIFEST).read_text()
    record.data["metrics"]["bad"] = object()  # not JSON: the write fails half way
    with pytest.raises(TypeError):
        record.write()
    assert (tmp_path / MANIFEST).read_text() == before
    assert json.loads(before)["job"] == "demo"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    record = RunRecord(tmp_path / "run", job="demo", collect_environment=False)
    record.finish("ok")
    with MetricsWriter(tmp_path / "run") as writer:
        writer.write(0, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_missing_records_raise_with_a_fix(tmp_path):
    with pytest.raises(MissingRecordError, match="does not exist"):
        load_record(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_record(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(MissingRecordError, match="unreadable"):
        load_record(tmp_path)


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_state_tracks_commit_changes_and_untracked_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    assert environment.git_state(repo)["commit"] is None  # no commit yet, still described
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = environment.git_state(repo)
    assert clean["commit"] == _git(repo, "rev-parse", "HEAD")
    assert clean["dirty"] is False
    assert clean["diff_sha256"] == hashlib.sha256(b"").hexdigest()
    (repo / "a.py").write_text("x = 2\n")
    edited = environment.git_state(repo)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=repo, capture_output=True).stdout
    assert edited["dirty"] is True and edited["diff_sha256"] == hashlib.sha256(diff).hexdigest()
    (repo / "b.py").write_text("y = 1\n")
    assert environment.git_state(repo)["diff_sha256"] != edited["diff_sha256"]
    assert environment.git_state(tmp_path) is None  # not a work tree top: no git facts


def _tensorboard_scalars(folder):
    """(tag, step, value) from TensorBoard event files, read with the Event protobuf."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(folder)):
        raw = (Path(folder) / name).read_bytes()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            payload = raw[offset + 12: offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(0, {"loss": 2.5, "reward": np.float32(0.25)})
        writer.write(1, {"loss": jax.numpy.asarray(1.5)})
        with pytest.raises(ValueError, match="'vec' is not a scalar"):
            writer.write(2, {"vec": np.ones(3)})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 2.5), (1, 1.5)]
    assert rows[0]["reward"] == 0.25 and "time" in rows[0]
    assert sorted(_tensorboard_scalars(tmp_path / "tensorboard")) == [
        ("loss", 0, 2.5), ("loss", 1, 1.5), ("reward", 0, 0.25)]
    # a torn last line (killed mid-write) is skipped
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "lo')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


def test_json_conversion_and_number_comparison():
    assert to_jsonable({"p": Path("a/b"), "t": (1, np.int64(2)), "a": np.arange(2), "s": {2, 1}}) == {
        "p": "a/b", "t": [1, 2], "a": [0, 1], "s": [1, 2]}
    assert flatten_scalars({"a": {"b": 1, "c": [0.5, "x"]}, "d": np.array([1, 2])}) == {
        "a.b": 1, "a.c[0]": 0.5, "d[0]": 1, "d[1]": 2}
    assert same_number(float("nan"), float("nan")) and not same_number(1.0, 1.0 + 1e-12)
    assert same_number(1.0, 1.0 + 1e-12, rtol=1e-9) and not same_number(1.0, None)


def test_progress_is_quiet_off_a_terminal_and_tables_align(capsys):
    from iapo_jax.runtime.progress import quiet_progress

    bar = progress(range(3), desc="x")  # a log: one line per 30 s at most, none for a short loop
    assert list(bar) == [0, 1, 2] and capsys.readouterr().err == ""
    with quiet_progress():
        assert progress(range(3), desc="x").disable
    table = format_table([{"metric": "loss", "value": 0.123456789}, {"metric": "n", "value": 12}])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split() == ["loss", "0.123457"] and lines[3].split() == ["n", "12"]
    assert lines[2].index("0.123457") == lines[0].index("value")
