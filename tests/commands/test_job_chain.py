"""Trained artefacts feed the next job through the command line, on a tiny chat Llama.

train-rm -> calibrate with that reward model -> ctrl with it -> a second ctrl run starting from the
first one's policy -> eval of the two policies against each other (paired intervals); and
train-scorer -> blockwise CD with that prefix scorer, alone and in a weighted spec. Each result is
checked against something the job did not compute: the reward model scored again through the
library, win rates enumerated over all sample pairs, blockwise CD's argmax under rescaled weights.
"""

import itertools
import json

import numpy as np
import pytest

from iapo_jax import cli
from iapo_jax.commands.job_outputs import read_jsonl
from iapo_jax.rewards.calibration import ReferencePool
from iapo_jax.runtime.manifest import load_record

TOKENS = ["--max-new-tokens", "8"]
CTRL = ["--transform", "exp", "--t", "4", "--prompts-per-step", "4", "--samples-per-prompt", "4",
        "--learning-rate", "1e-3", "--save-every", "1", *TOKENS]


def iapo(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def sampling_win_rate(a, b):
    """W(a > b) of single samples, by enumerating every pair of one prompt's samples."""
    return np.mean([(x > y) + 0.5 * (x == y) for x, y in itertools.product(a, b)])


def by_prompt(rows, key="reward"):
    out = {}
    for r in rows:
        out.setdefault(r["prompt_index"], []).append(r[key])
    return [out[i] for i in sorted(out)]


@pytest.mark.slow
def test_reward_model_calibrate_ctrl_twice_and_eval_paired(capsys, tmp_path, tiny_chat_llama_dir):
    model = tiny_chat_llama_dir
    rm, cal, first, second, ev = (tmp_path / n for n in ("rm", "cal", "ctrl1", "ctrl2", "eval"))
    iapo(capsys, "train-rm", "--model", model, "--scorer", "length", "--num-prompts", 6,
         "--eval-prompts", 4, "--samples-per-prompt", 3, *TOKENS, "--pairing", "all", "--steps", 5,
         "--batch-size", 4, "--mode", "head", "--eval-every", 0, "--batch-prompts", 4, "--data", 1,
         "--run-dir", rm)

    iapo(capsys, "calibrate", "--model", model, "--reward", rm, "--num-prompts", 4, "--samples", 4,
         *TOKENS, "--batch-prompts", 4, "--data", 1, "--run-dir", cal)
    pool = ReferencePool.load(cal / "pool")
    assert pool.meta["reward"] == str(rm)
    from iapo_jax.rewards import get_reward

    again = get_reward("reward_model", path=rm)  # the library's own route to the same head
    for prompt, texts, scores in zip(pool.prompts, pool.responses, pool.scores):
        np.testing.assert_allclose(sorted(again.score([prompt] * len(texts), texts)), scores,
                                   rtol=1e-5, atol=1e-6)
    fp = load_record(cal)["fingerprints"]["reward"]
    assert fp["path"] == str(rm) and len(fp["sha256"]) == 64

    iapo(capsys, "ctrl", "--model", model, "--reward", rm, "--pool-dir", cal / "pool", *CTRL,
         "--steps", 2, "--run-dir", first)
    record = load_record(first)
    assert record["fingerprints"]["reward"]["path"] == str(rm)
    assert (first / "policy" / "config.json").is_file()

    # The trained policy starts another run; pi_ref stays the original model (and the pool's).
    iapo(capsys, "ctrl", "--model", model, "--init-policy", first, "--reward", rm,
         "--pool-dir", cal / "pool", *CTRL, "--steps", 1, "--run-dir", second)
    record = load_record(second)
    assert record["extra"]["models"] == {"reference": str(model), "init_policy": str(first / "policy")}
    assert record["fingerprints"]["init_policy"]["sha256"] == \
        load_record(first)["fingerprints"]["policy"]["sha256"]
    assert record["metrics"]["kl"] > 0  # starts away from pi_ref: the first run's policy

    out = iapo(capsys, "eval", "--pool", cal, "--policy", second, "--baseline", first, "--samples", 4,
               "--ns", 2, "--bootstrap", 200, "--batch-prompts", 4, "--data", 1, "--run-dir", ev)
    assert "Policy against baseline" in out
    metrics = load_record(ev)["metrics"]
    a = by_prompt(read_jsonl(ev / "samples.jsonl"))
    b = by_prompt(read_jsonl(ev / "baseline_samples.jsonl"))
    ref = pool.scores
    wa = np.array([sampling_win_rate(x, y) for x, y in zip(a, ref)])
    wb = np.array([sampling_win_rate(x, y) for x, y in zip(b, ref)])
    head = np.mean([sampling_win_rate(x, y) for x, y in zip(a, b)])
    assert metrics["win_rate.sampling"] == pytest.approx(wa.mean())
    assert metrics["baseline.win_rate.sampling"] == pytest.approx(wb.mean())
    assert metrics["difference.sampling"] == pytest.approx((wa - wb).mean())
    assert metrics["head_to_head.sampling"] == pytest.approx(head)
    for name in ("sampling", "bon_2", "won_2"):
        assert metrics[f"difference_ci_low.{name}"] <= metrics[f"difference.{name}"] <= \
            metrics[f"difference_ci_high.{name}"]
    # every response is scored by the reward model the pool names
    rows = read_jsonl(ev / "baseline_samples.jsonl")
    np.testing.assert_allclose([r["reward"] for r in rows],
                               again.score([r["prompt"] for r in rows], [r["response"] for r in rows]),
                               rtol=1e-5, atol=1e-6)

    # the policy loads in generate and calibrate too
    iapo(capsys, "generate", "--model", first, "--mode", "bon", "--n", 2, "--reward", rm,
         "--num-prompts", 2, *TOKENS, "--run-dir", tmp_path / "gen")
    served = read_jsonl(tmp_path / "gen" / "samples.jsonl")
    assert all(r["reward"] == pytest.approx(max(r["candidate_scores"]), rel=1e-5) for r in served)
    assert load_record(tmp_path / "gen")["fingerprints"]["model"]["source"] == str(first / "policy")


@pytest.mark.slow
def test_prefix_scorer_drives_blockwise_cd_alone_and_in_a_weighted_spec(capsys, tmp_path,
                                                                       tiny_chat_llama_dir):
    model, sc = tiny_chat_llama_dir, tmp_path / "scorer"
    iapo(capsys, "train-scorer", "--model", model, "--reward", "length", "--num-prompts", 4,
         "--samples-per-prompt", 2, "--eval-prompts", 3, "--eval-samples", 2, *TOKENS, "--steps", 5,
         "--batch-size", 4, "--eval-every", 0, "--no-win-rate", "--run-dir", sc)
    common = ["generate", "--model", model, "--mode", "blockwise", "--n", 3, "--block-size", 4,
              "--num-prompts", 3, "--reward", "length", *TOKENS, "--batch-prompts", 4, "--data", 1]
    runs = {}
    for name, spec in (("alone", sc), ("doubled", f"2*{sc}"), ("mixed", f"{sc}+0*length:target=3")):
        iapo(capsys, *common, "--scorer", spec, "--run-dir", tmp_path / name)
        runs[name] = read_jsonl(tmp_path / name / "samples.jsonl")
    # A positive factor on every weight, or a zero-weight text term, leaves each block's argmax
    # where it was: the same responses; the reported score scales with the weights.
    for name in ("doubled", "mixed"):
        assert [r["response"] for r in runs[name]] == [r["response"] for r in runs["alone"]]
    np.testing.assert_allclose([r["scorer_value"] for r in runs["doubled"]],
                               [2 * r["scorer_value"] for r in runs["alone"]], rtol=1e-5)
    np.testing.assert_allclose([r["scorer_value"] for r in runs["mixed"]],
                               [r["scorer_value"] for r in runs["alone"]], rtol=1e-5, atol=1e-6)
    record = load_record(tmp_path / "mixed")["fingerprints"]["scorer"]
    assert [t["kind"] for t in record["terms"]] == ["prefix_scorer", "packaged"]
    assert record["terms"][0]["path"] == str(sc)

    # the same scorer used as a reward reads V at the end of each response
    iapo(capsys, "calibrate", "--model", model, "--reward", f"0.5*{sc}+0.5*length", "--num-prompts", 2,
         "--samples", 2, *TOKENS, "--batch-prompts", 2, "--data", 1, "--run-dir", tmp_path / "cal")
    pool = ReferencePool.load(tmp_path / "cal" / "pool")
    from iapo_jax.rewards.value_reward import ValueModelReward

    value = ValueModelReward.from_run(sc)
    for prompt, texts, scores in zip(pool.prompts, pool.responses, pool.scores):
        want = 0.5 * np.asarray(value.score([prompt] * 2, texts)) + 0.5 * np.array(
            [len(t.split()) for t in texts])
        np.testing.assert_allclose(sorted(want), scores, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "cal" / "pool" / "pool.json").read_text())["meta"]["reward"] == \
        f"0.5*{sc}+0.5*length"
