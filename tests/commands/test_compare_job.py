"""The comparison pipeline (the quickstart's engine) end to end through the CLI, and its reproduce."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iapo_jax.evaluation import inference_time_win_rate
from iapo_jax.evaluation.comparison import CompareConfig
from iapo_jax.rewards.calibration import ReferencePool

ARGS = ["--reward", "length", "--steps", "2", "--train-prompts", "8", "--eval-prompts", "8",
        "--pool-size", "8", "--eval-samples", "8", "--max-new-tokens", "12", "--eval-ns", "1", "2",
        "--methods", "ctrl", "calibrated", "--learning-rate", "1e-3"]


def _iapo(*args, cwd):
    return subprocess.run([sys.executable, "-m", "iapo_jax.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_compare_writes_table_plot_record_and_reproduces(tiny_chat_llama_dir, tmp_path):
    run = tmp_path / "run"
    done = _iapo("compare", "--model", tiny_chat_llama_dir, *ARGS, "--probe-every", 1, "--probe-samples", 4,
                 "--judges", "textblob", "--run-dir", run, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (run / "results.md").read_text()
    assert "| ctrl |" in table and "| calibrated |" in table and "| reference |" in table
    # CTRL against calibrated RLHF, paired: W(A) and W(B) recomputed from the saved samples' scores
    rows = json.loads((run / "results.json").read_text())
    ref_scores = ReferencePool.load(run / "pool_eval").scores
    (sampling, bon), = [[d for d in json.loads((run / "differences.json").read_text()) if "judge" not in d]]
    assert (sampling["a"], sampling["b"], bon["procedure"], bon["n"]) == ("ctrl", "calibrated", "bon", 4)
    for d in (sampling, bon):
        for side, name in (("policy", "ctrl"), ("baseline", "calibrated")):
            assert d[side] == pytest.approx(inference_time_win_rate(
                np.asarray(rows[name]["scores"]), ref_scores, d["procedure"], d["n"]))
        assert d["minimum_detectable"] > 0
    assert "| ctrl - calibrated | BoN_4 |" in table
    # A judge rescores the same samples; best-of-4 still selects on the training reward (length).
    assert "Judged by textblob" in table and "judged by textblob" in table
    judged_ref = np.asarray(rows["reference"]["judges"]["textblob"]["scores"])
    for name in ("ctrl", "calibrated"):
        judged = rows[name]["judges"]["textblob"]
        assert judged["win_rates"]["bon@4"]["win_rate"] == pytest.approx(inference_time_win_rate(
            np.asarray(judged["scores"]), judged_ref, "bon", 4,
            selection=(np.asarray(rows[name]["scores"]), ref_scores)))
    judged_diffs = [d for d in json.loads((run / "differences.json").read_text()) if d.get("judge")]
    assert [(d["judge"], d["procedure"]) for d in judged_diffs] == [("textblob", "sampling"), ("textblob", "bon")]
    assert rows["ctrl"]["kl_by_prompt"]["p10"] <= rows["ctrl"]["kl_by_prompt"]["p90"]
    # learning curves: a probe after each of the 2 steps, with the prediction at the probe's KL
    assert [c["step"] for c in rows["ctrl"]["curve"]] == [1, 2]
    curves = (run / "learning_curves.md").read_text()
    assert "| calibrated | 2 |" in curves and "judged by textblob |" in curves
    assert 0.0 <= rows["ctrl"]["curve"][-1]["judges"]["textblob"] <= 1.0
    assert (run / "learning_curves.png").stat().st_size > 1000
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("ctrl/probe_win_rate" in r for r in logged)
    timed = [r["ctrl/update_seconds"] for r in logged if "ctrl/update_seconds" in r]
    assert len(timed) == 2 and min(timed) > 0  # one row per training step, each timed
    assert (run / "win_rates.png").stat().st_size > 1000
    record = json.loads((run / "manifest.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["reference.win_rate.bon@2"] == 0.5
    assert record["metrics"]["reference.judge.textblob.win_rate.bon@4"] == 0.5
    assert "judge_0" in record["fingerprints"]
    assert {"pool_train", "pool_eval", "train_prompts"} <= set(record["data"])

    again = _iapo("reproduce", run, "--run-dir", tmp_path / "again", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    # Its trained policies and held-out pool feed `iapo eval`: CTRL against calibrated RLHF, paired.
    assert (run / "policies" / "ctrl" / "config.json").is_file()
    assert record["fingerprints"]["policy_ctrl"]["role"] == "output"
    both = _iapo("eval", "--pool", run / "pool_eval", "--policy", run / "policies" / "ctrl",
                 "--baseline", run / "policies" / "calibrated", "--samples", 8, "--ns", 2,
                 "--bootstrap", 100, "--run-dir", tmp_path / "eval", cwd=tmp_path)
    assert both.returncode == 0, both.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "manifest.json").read_text())["metrics"]
    assert metrics["difference.bon_2"] == pytest.approx(
        metrics["win_rate.bon_2"] - metrics["baseline.win_rate.bon_2"])
    whole = _iapo("generate", "--model", run, "--run-dir", tmp_path / "gen", cwd=tmp_path)
    assert whole.returncode == 2 and "trained policies" in whole.stderr  # which of them: named
    assert "policies/calibrated" in whole.stderr and "calibrated, ctrl" in whole.stderr


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"procedure": "sampling"}, "bon or won"),
        ({"methods": ("ctrl", "dpo")}, "unknown methods"),
        ({"eval_samples": 6}, "multiples of samples_per_prompt"),
        ({"beta": -1.0}, "beta must be positive"),
        ({"methods": ("optimal",), "betas": (0.1,)}, "solved at a KL"),
        ({"methods": ("optimal",), "target_kl": None}, "solved at a KL"),
        ({"probe_every": -1}, "probe_every must be >= 0"),
        ({"probe_every": 5, "probe_samples": 2}, "probe_samples"),
        ({"judges": ("nosuch",)}, "unknown reward 'nosuch' in --judges"),
        ({"judges": ("vader", "vader")}, "judges must be distinct"),
    ],
)
def test_bad_comparison_settings_fail_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig(**kwargs).validate()


def test_optimal_method_is_the_exact_optimum_at_the_target_kl():
    """compare's optimal method trains on the analytic tool's optimal tilt at target_kl, and its
    predicted win rate is the exact optimum's (which no transform's curve beats)."""
    from iapo_jax.evaluation.predicted_win_rate import predicted_win_rate
    from iapo_jax.theory.analysis import analyse

    cfg = CompareConfig(methods=("ctrl", "optimal"), procedure="soft_bon", lam=0.1, target_kl=0.5).validate()
    trainer = cfg.ctrl_config("optimal")
    assert trainer.transform == "optimal" and trainer.procedure == "soft_bon" and trainer.lam == 0.1
    best = analyse("soft_bon", 4, "optimal", kl=0.5, lam=0.1).win_rate
    assert predicted_win_rate("optimal", cfg, 0.5) == pytest.approx(best)
    assert predicted_win_rate("ctrl", cfg, 0.5) <= best + 1e-9


def test_optimal_sweep_point_is_the_optimum_solved_at_its_kl():
    """A sweep by KL trains the optimal method at each point on the optimum solved at that KL, with
    the beta at which tilting pi_ref by that reward gives back the optimum: check that tilting the
    uniform law of u by exp(Phi / beta) has exactly the point's KL."""
    import numpy as np

    from iapo_jax.evaluation.kl_sweep import sweep_points
    from iapo_jax.rewards.transforms import optimal_table

    cfg = CompareConfig(methods=("optimal", "calibrated"), sweep_kls=(0.25, 1.0)).validate()
    points = [p for p in sweep_points(cfg) if p.method == "optimal"]
    assert [p.kl for p in points] == [0.25, 1.0]
    for p in points:
        trainer = cfg.ctrl_config(p.method, beta=p.beta, t=p.t, optimal_kl=p.kl)
        assert trainer.optimal_kl == p.kl and trainer.target_kl is None
        table = optimal_table("bon", 4, kl=p.kl)
        dens = np.exp(table.phi / p.beta)
        dens /= np.trapezoid(dens, table.u)
        assert np.trapezoid(dens * np.log(dens), table.u) == pytest.approx(p.kl, rel=2e-3)
    assert cfg.ctrl_config("calibrated", beta=0.1, optimal_kl=0.25).optimal_kl is None


@pytest.mark.slow
def test_pools_from_reuses_an_earlier_runs_pools_so_added_methods_pair_with_it(tiny_chat_llama_dir, tmp_path):
    small = ["--model", tiny_chat_llama_dir, "--reward", "length", "--steps", "1", "--train-prompts", "4",
             "--eval-prompts", "4", "--pool-size", "8", "--eval-samples", "8", "--max-new-tokens", "8",
             "--eval-ns", "1", "2", "--no-save-policies"]
    first, second = tmp_path / "first", tmp_path / "second"
    done = _iapo("compare", *small, "--methods", "ctrl", "calibrated", "--run-dir", first, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = _iapo("compare", *small, "--pool-size", "16", "--methods", "raw", "--pools-from", first,
                    "--run-dir", tmp_path / "refused", cwd=tmp_path)
    assert refused.returncode == 2 and "pool_size 8 there, 16 here" in refused.stderr
    assert not (tmp_path / "refused").exists()  # refused before a run directory or any compute
    added = _iapo("compare", *small, "--methods", "raw", "--pools-from", first, "--run-dir", second, cwd=tmp_path)
    assert added.returncode == 0, added.stderr[-3000:]
    assert f"the pools of {first}" in added.stderr and "reference samples x" not in added.stderr
    data = [json.loads((run / "manifest.json").read_text())["data"] for run in (first, second)]
    assert data[0]["pool_train"] == data[1]["pool_train"] and data[0]["pool_eval"] == data[1]["pool_eval"]
    script = str(Path(__file__).parents[2] / "experiments/ctrl/join_runs.py")
    joined = subprocess.run([sys.executable, script, str(first), str(second), "--out", str(tmp_path / "joined")],
                            capture_output=True, text=True, timeout=600)
    assert joined.returncode == 0, joined.stderr[-3000:]
    pairs = {(d["a"], d["b"]) for d in json.loads((tmp_path / "joined" / "differences.json").read_text())}
    assert pairs == {("ctrl", "calibrated"), ("ctrl", "raw"), ("calibrated", "raw")}


def test_pools_from_must_be_a_compare_run_that_sampled_pools_as_this_run_would(tmp_path):
    from iapo_jax.evaluation.reused_pools import check_pools_from

    run = tmp_path / "run"
    cfg = CompareConfig(pools_from=str(run))
    with pytest.raises(ValueError, match="no manifest.json there"):
        check_pools_from(cfg)
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"job": "compare", "config": {"seed": 3, "reward": "vader"}}))
    with pytest.raises(ValueError, match=r"seed 3 there, 0 here"):
        check_pools_from(cfg)
    (run / "manifest.json").write_text(json.dumps({"job": "compare", "config": {"seed": 0}}))
    with pytest.raises(ValueError, match="no pool_train/ folder"):
        check_pools_from(cfg)
    (run / "manifest.json").write_text(json.dumps({"job": "ctrl", "config": {}}))
    with pytest.raises(ValueError, match="is a 'ctrl' run"):
        check_pools_from(cfg)
