"""Beta sweeps: per-method betas from the closed form, the matched-KL read-out, and the job end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.evaluation.comparison import CompareConfig
from iapo_jax.evaluation.kl_sweep import BELOW_FIRST_POINT, curve, matched_kl_table, sweep_points, trainer_beta
from iapo_jax.rewards.transforms import get_transform, unit_range_transform
from iapo_jax.theory.analysis import analyse


@pytest.mark.parametrize("procedure,transform", [("bon", "identity"), ("bon", "exp"), ("won", "negexp"),
                                                 ("bon", "log")])
def test_trainer_beta_gives_the_tilt_of_the_requested_kl(procedure, transform):
    """The trainer's reward at the returned beta tilts pi_ref exactly as the closed form's Phi does
    at its beta for that KL: Phi_trainer(u) / beta_trainer - Phi(u) / beta is constant in u."""
    kl = 0.5
    beta, t = trainer_beta(procedure, 4, transform, kl)
    ref = analyse(procedure, 4, transform, kl=kl)
    u = jnp.linspace(0.01, 0.99, 41)
    ours = np.asarray(unit_range_transform(transform, t)(u), np.float64) / beta
    theirs = np.asarray(get_transform(transform, t)(u), np.float64) / math.exp(ref.log_beta)
    diff = ours - theirs
    assert np.ptp(diff) < 1e-4 * max(1.0, np.ptp(theirs))
    # and that tilt has the requested KL (closed form at the beta in the formulas' own units)
    if ref.beta is not None:
        assert analyse(procedure, 4, transform, beta=ref.beta, t=t).kl == pytest.approx(kl, rel=1e-4)


def test_sweep_kls_give_each_method_its_own_beta_and_explicit_betas_are_shared():
    cfg = CompareConfig(procedure="won", methods=("ctrl", "calibrated", "raw"), sweep_kls=(0.25, 1.0))
    points = sweep_points(cfg.validate())
    by = {(p.method, p.kl): p for p in points}
    assert len(points) == 6
    # -exp(-t u) at its best t needs a far smaller beta than the identity for the same KL
    assert by["ctrl", 1.0].beta < 1e-3 * by["calibrated", 1.0].beta
    assert by["raw", 0.25].beta == by["calibrated", 0.25].beta  # raw borrows the identity's
    assert by["ctrl", 0.25].t < by["ctrl", 1.0].t and by["calibrated", 1.0].t is None
    for p in points:  # a sweep point trains at a fixed beta, with CTRL's t of that point
        c = cfg.ctrl_config(p.method, beta=p.beta, t=p.t)
        assert c.target_kl is None and c.beta == p.beta and c.t == p.t

    shared = sweep_points(CompareConfig(methods=("ctrl", "calibrated"), betas=(0.1, 0.3)).validate())
    assert sorted({p.beta for p in shared}) == [0.1, 0.3] and len(shared) == 4


def _row(method, kl, w):
    win = {"win_rate": w, "ci_low": w - 0.05, "ci_high": w + 0.05}
    return {"method": method, "beta": 1.0, "kl": kl, "kl_se": 0.01, "mean_reward": 0.0,
            "win_rates": {"bon@4": win, "sampling@1": win}}


def test_matched_kl_table_reads_out_only_between_each_methods_measured_points():
    """Linear interpolation between measured points; nothing below a method's first measured KL
    (pi_ref's exact (0, 1/2) is not a measured point with an interval) nor beyond the common reach."""
    cfg = CompareConfig(methods=("ctrl", "calibrated"), sweep_kls=(0.5, 1.0, 1.5, 3.0))
    rows = {"reference": {"kl": 0.0, "win_rates": {}},
            "a": _row("ctrl", 1.0, 0.7), "b": _row("ctrl", 2.0, 0.8),
            "c": _row("calibrated", 1.2, 0.9), "d": _row("calibrated", 1.6, 0.94)}
    x, w, lo, hi = curve(rows, "ctrl", "bon@4")
    assert list(x) == [1.0, 2.0] and list(w) == [0.7, 0.8] and np.allclose(lo, [0.65, 0.75])
    table = matched_kl_table(cfg, rows)
    # KL 3.0 is beyond calibrated's reach (1.6); KL 0.5 is below both first points: no rows
    assert "| 3.00 |" not in table and "| 0.50 |" not in table
    # KL 1.0: ctrl at its first point, calibrated (first point 1.2) not read out
    assert f"| 1.00 | 0.700 [0.650, 0.750] | {BELOW_FIRST_POINT} |" in table
    # KL 1.5: ctrl halfway between 1.0 and 2.0, calibrated 3/4 of the way from 1.2 to 1.6
    assert "| 1.50 | 0.750 [0.700, 0.800] | 0.930 [0.880, 0.980] |" in table
    assert "First measured KL per method: ctrl 1.00, calibrated 1.20." in table


def test_matched_kl_table_says_when_no_kl_can_be_read_out():
    cfg = CompareConfig(methods=("ctrl", "calibrated"), sweep_kls=(0.5,))
    rows = {"a": _row("ctrl", 1.0, 0.7), "c": _row("calibrated", 1.6, 0.9)}
    assert "(no KL that every method reached" in matched_kl_table(cfg, rows)


@pytest.mark.parametrize("kwargs,match", [({"betas": (0.1,), "sweep_kls": (1.0,)}, "not both"),
                                          ({"sweep_kls": (0.5, 0.0)}, "sweep_kls value must be positive"),
                                          ({"betas": (-0.1,)}, "betas value must be positive")])
def test_bad_sweep_settings_fail_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig(**kwargs).validate()


@pytest.mark.slow
def test_compare_sweep_writes_curves_and_matched_kl_table(tiny_chat_llama_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--reward", "length", "--steps", "2", "--train-prompts", "8", "--eval-prompts", "8",
            "--pool-size", "8", "--eval-samples", "8", "--max-new-tokens", "12", "--eval-ns", "1", "4",
            "--methods", "ctrl", "calibrated", "--learning-rate", "1e-3", "--sweep-kls", "0.5", "4.0"]
    done = subprocess.run([sys.executable, "-m", "iapo_jax.cli", "compare", "--model", str(tiny_chat_llama_dir),
                           *args, "--run-dir", str(run)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((run / "results.json").read_text())
    swept = {k: r for k, r in rows.items() if k != "reference"}
    assert len(swept) == 4 and {r["method"] for r in swept.values()} == {"ctrl", "calibrated"}
    assert {r["beta_for_kl"] for r in swept.values()} == {0.5, 4.0}
    # the recorded betas are the closed form's: a larger KL needs a smaller beta
    for m in ("ctrl", "calibrated"):
        by_kl = {r["beta_for_kl"]: r for r in swept.values() if r["method"] == m}
        assert by_kl[4.0]["beta"] < by_kl[0.5]["beta"]
    assert "| KL (nats) | ctrl: W (BON_4) | calibrated: W (BON_4) |" in (run / "matched_kl.md").read_text()
    # every point carries per-prompt KLs and scores, so the methods are also compared paired
    assert all(len(r["kl_per_prompt"]) == 8 for r in swept.values())
    paired = json.loads((run / "matched_kl_differences.json").read_text())
    assert [(d["kl"], d["a"], d["b"]) for d in paired] == [(0.5, "ctrl", "calibrated"), (4.0, "ctrl", "calibrated")]
    assert "paired bootstrap" in (run / "matched_kl.md").read_text()
    assert (run / "win_rate_vs_kl.png").stat().st_size > 1000


def _fake_run(path, methods, rows, **overrides):
    config = {"methods": methods, "procedure": "bon", "deploy_n": 4, "eval_ns": [4], "sweep_kls": [0.5, 1.0],
              "seed": 0}
    config.update(overrides)
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"config": config, "data": {"pool_eval": {"sha256": "x"}}}))
    (path / "results.json").write_text(json.dumps(rows))
    return path


JOIN = str(Path(__file__).parents[2] / "experiments/ctrl/join_runs.py")


def test_join_runs_joins_sweeps_that_differ_only_in_methods(tmp_path):
    script = JOIN
    ref = _row("reference", 0.0, 0.5)
    a = _fake_run(tmp_path / "a", ["ctrl"], {"reference": ref, "c": _row("ctrl", 1.0, 0.7)})
    # b records a setting that a had not yet (a's record predates it): a ran with its default
    b = _fake_run(tmp_path / "b", ["raw"], {"reference": ref, "r": _row("raw", 0.5, 0.6),
                                            "s": _row("raw", 2.0, 0.9)}, kl_controller="proportional")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, script, str(a), str(b), "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # both runs' curves in one table: raw interpolated from 0.5 to 2.0, ctrl only from its first KL
    merged = (out / "matched_kl.md").read_text()
    assert f"| 0.50 | {BELOW_FIRST_POINT} | 0.600 [0.550, 0.650] |" in merged
    assert "| 1.00 | 0.700 [0.650, 0.750] | 0.700 [0.650, 0.750] |" in merged
    assert set(json.loads((out / "results.json").read_text())) == {"reference", "c", "r", "s"}

    c = _fake_run(tmp_path / "c", ["raw"], {"reference": ref}, seed=1)
    bad = subprocess.run([sys.executable, script, str(a), str(c), "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "settings differ" in bad.stderr and "['seed']" in bad.stderr

    same = _fake_run(tmp_path / "d", ["ctrl"], {"reference": ref, "c": _row("ctrl", 2.0, 0.6)})
    again = subprocess.run([sys.executable, script, str(a), str(same), "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode != 0 and "in an earlier run too" in again.stderr


def test_join_runs_pairs_methods_trained_in_separate_runs_as_one_run_would(tmp_path):
    """Two single-target runs (ctrl + calibrated, then raw) joined: every two methods get the paired
    difference that one run of all three would report, against the shared reference pool."""
    from iapo_jax.data.fingerprint import fingerprint
    from iapo_jax.evaluation.comparison import compare_methods
    from iapo_jax.rewards.calibration import ReferencePool

    rng = np.random.default_rng(0)
    pool = ReferencePool.build([f"p{i}" for i in range(6)], rng.normal(size=(6, 8)),
                               responses=[[f"r{i}{j}" for j in range(8)] for i in range(6)])
    sha = fingerprint(pool.fingerprint())
    scores = {m: rng.normal(loc=shift, size=(6, 8)) for m, shift in (("ctrl", 0.6), ("calibrated", 0.5),
                                                                      ("raw", 0.0))}

    def run(path, methods):
        rows = {"reference": _row("reference", 0.0, 0.5)}
        rows.update({m: {**_row(m, 0.5, 0.6), "scores": scores[m].tolist()} for m in methods})
        path = _fake_run(path, methods, rows, sweep_kls=[], target_kl=0.5)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["data"]["pool_eval"]["sha256"] = sha
        (path / "manifest.json").write_text(json.dumps(manifest))
        return path

    a, b = run(tmp_path / "a", ["ctrl", "calibrated"]), run(tmp_path / "b", ["raw"])
    no_pool = subprocess.run([sys.executable, JOIN, str(a), str(b), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True, timeout=300)
    assert no_pool.returncode != 0 and "--reference-pool" in no_pool.stderr
    pool.save(a / "pool_eval")
    done = subprocess.run([sys.executable, JOIN, str(a), str(b), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    joined = json.loads((tmp_path / "out" / "differences.json").read_text())
    assert {(d["a"], d["b"]) for d in joined} == {("ctrl", "calibrated"), ("ctrl", "raw"), ("calibrated", "raw")}
    cfg = CompareConfig(methods=("ctrl", "calibrated", "raw"), procedure="bon", deploy_n=4, eval_ns=(4,),
                        target_kl=0.5, seed=0)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert joined == compare_methods(cfg, rows, pool.scores)
    assert "| ctrl - raw | BoN_4 |" in (tmp_path / "out" / "results.md").read_text()

    other = ReferencePool.build(pool.prompts, pool.scores + 1.0, responses=pool.responses)
    other.save(tmp_path / "other")
    bad = subprocess.run([sys.executable, JOIN, str(a), str(b), "--out", str(tmp_path / "o"),
                          "--reference-pool", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "fingerprints differ" in bad.stderr
