"""The reward spec: parsing, the checks made before any model loads, and what it builds.

Trained terms here are run directories laid out as `iapo train-rm` / `iapo train-scorer` leave them
(head_model.json naming the base model, a checkpoint folder); parsing and the vocabulary check read
only those files and the models' configs, so no weights are needed until a term is built.
"""

import json

import numpy as np
import pytest

from iapo_jax import cli
from iapo_jax.rewards.spec import (
    PACKAGED,
    PREFIX_SCORER,
    REWARD_MODEL,
    RewardSpecError,
    WeightedReward,
    build_reward,
    check_fits,
    check_on_tokens,
    parse_reward_spec,
    spec_fingerprint,
)


def fake_head_run(path, base, kind="reward", step=3):
    """A run directory as a finished training job leaves it (no weights: parsing never reads them)."""
    path.mkdir(parents=True)
    (path / "checkpoints" / str(step)).mkdir(parents=True)
    (path / "head_model.json").write_text(json.dumps({
        "kind": kind, "base": str(base), "finetune": {"mode": "head"}, "checkpoint_dir": "checkpoints",
        "step": step}))
    return path


@pytest.fixture()
def runs(tmp_path, tiny_chat_llama_dir, tiny_llama_dir):
    return {"rm": fake_head_run(tmp_path / "rm", tiny_chat_llama_dir),
            "scorer": fake_head_run(tmp_path / "scorer", tiny_chat_llama_dir, kind="value"),
            "other_vocab": fake_head_run(tmp_path / "rm256", tiny_llama_dir),
            "tmp": tmp_path}


def test_names_options_paths_and_weighted_sums_parse_to_their_terms(runs):
    spec = parse_reward_spec("vader")
    assert [(t.kind, t.name, t.weight) for t in spec.terms] == [(PACKAGED, "vader", 1.0)]
    assert str(spec) == "vader" and spec.is_single_packaged

    spec = parse_reward_spec("length:target=20")
    assert spec.terms[0].option_dict == {"target": 20} and str(spec) == "length:target=20"

    spec = parse_reward_spec(str(runs["rm"]))
    assert spec.terms[0].kind == REWARD_MODEL and spec.terms[0].path == str(runs["rm"])
    assert parse_reward_spec(str(runs["rm"] / "head_model.json")).terms[0].path == str(runs["rm"])
    assert parse_reward_spec(f"reward_model:path={runs['rm']}").terms == spec.terms  # older form
    assert parse_reward_spec(str(runs["scorer"])).terms[0].kind == PREFIX_SCORER

    spec = parse_reward_spec(f"0.7*vader+0.3*{runs['rm']}:step=3+-1.5e+0*length:target=4")
    assert [(t.kind, t.weight) for t in spec.terms] == [(PACKAGED, 0.7), (REWARD_MODEL, 0.3),
                                                         (PACKAGED, -1.5)]
    assert spec.terms[1].option_dict == {"step": 3} and spec.terms[2].option_dict == {"target": 4}
    assert parse_reward_spec(str(spec)).terms == spec.terms  # the canonical form parses back

    merged = parse_reward_spec("length", {"target": 7})  # --reward-options keeps working
    assert merged.terms[0].option_dict == {"target": 7}


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("vadr", "unknown reward 'vadr'"),
    ("runs/nothing-here", "does not exist"),
    ("0.5*vader+", "empty term"),
    ("length:target", "not KEY=VALUE"),
    ("length:colour=red", "does not take option 'colour'"),
    ("vader:target=3", "it takes no options"),
    ("reward_model", "needs path=RUN_DIR"),
])
def test_bad_specs_are_one_line_errors(text, match):
    with pytest.raises(RewardSpecError, match=match) as err:
        parse_reward_spec(text)
    assert "\n" not in str(err.value)


def test_paths_must_hold_the_right_finished_artefact(runs, tiny_chat_llama_dir):
    with pytest.raises(RewardSpecError, match="no reward model or prefix scorer"):
        parse_reward_spec(str(runs["tmp"]))  # a folder, but no head_model.json
    policy_run = runs["tmp"] / "ctrl"
    (policy_run / "policy").mkdir(parents=True)
    (policy_run / "policy" / "config.json").write_text("{}")
    with pytest.raises(RewardSpecError, match="holds a trained policy"):
        parse_reward_spec(str(policy_run))
    with pytest.raises(RewardSpecError, match="holds a prefix scorer, not a reward model"):
        parse_reward_spec(f"reward_model:path={runs['scorer']}")
    unfinished = fake_head_run(runs["tmp"] / "unfinished", tiny_chat_llama_dir)
    (unfinished / "checkpoints" / "3").rmdir()
    with pytest.raises(RewardSpecError, match="no saved checkpoint"):
        parse_reward_spec(str(unfinished))
    with pytest.raises(RewardSpecError, match="positive integer"):
        parse_reward_spec(f"{runs['rm']}:step=-2")
    with pytest.raises(RewardSpecError, match="several terms"):
        parse_reward_spec(f"vader+{runs['rm']}", {"target": 3})


def test_vocabulary_of_every_trained_term_must_fit_the_policy(runs, tiny_chat_llama_dir, tiny_llama_dir):
    check_fits(parse_reward_spec(f"0.5*vader+0.5*{runs['rm']}"), str(tiny_chat_llama_dir))
    with pytest.raises(RewardSpecError, match=r"vocabulary of 256 tokens\) but the policy has 136"):
        check_fits(parse_reward_spec(f"vader+{runs['other_vocab']}"), str(tiny_chat_llama_dir))
    check_fits(parse_reward_spec(str(runs["other_vocab"])), str(tiny_llama_dir))
    check_on_tokens(parse_reward_spec(str(runs["scorer"])), "token-level CD")
    with pytest.raises(RewardSpecError, match="prefix scorer"):
        check_on_tokens(parse_reward_spec(f"{runs['scorer']}+vader"), "token-level CD")


def test_fingerprint_names_every_term_and_follows_the_head_files(runs):
    spec = parse_reward_spec(f"0.7*vader+0.3*{runs['rm']}")
    a = spec_fingerprint(spec)
    assert a["spec"] == str(spec) and [t["kind"] for t in a["terms"]] == [PACKAGED, REWARD_MODEL]
    assert a["sha256"] != spec_fingerprint(parse_reward_spec(f"0.6*vader+0.4*{runs['rm']}"))["sha256"]
    (runs["rm"] / "checkpoints" / "3" / "weights").write_text("changed")
    assert spec_fingerprint(spec)["sha256"] != a["sha256"]  # retrained head, same path


def test_weighted_sum_scores_are_the_weighted_sum_of_the_terms():
    prompts, responses = ["q"] * 3, ["one", "one two three", "one two three four five six"]
    spec = parse_reward_spec("2*length:target=3+-0.5*length:target=1")
    reward = build_reward(spec)
    assert isinstance(reward, WeightedReward)
    a = np.asarray(build_reward(parse_reward_spec("length:target=3")).score(prompts, responses))
    b = np.asarray(build_reward(parse_reward_spec("length:target=1")).score(prompts, responses))
    np.testing.assert_allclose(reward.score(prompts, responses), 2 * a - 0.5 * b, rtol=1e-6)


def test_a_bad_spec_on_the_command_line_is_exit_2_one_line_and_no_run(capsys, tmp_path, runs,
                                                                     tiny_chat_llama_dir):
    cases = [["calibrate", "--reward", str(tmp_path / "missing" / "rm")],
             ["calibrate", "--reward", str(runs["other_vocab"])],
             ["ctrl", "--reward", str(runs["tmp"])],
             ["compare", "--reward", "0.5*vadr+0.5*length"],
             ["generate", "--mode", "token-cd", "--scorer", f"{runs['scorer']}+length"]]
    for i, args in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        code = cli.main([*args, "--model", str(tiny_chat_llama_dir), "--run-dir", str(run_dir)])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not run_dir.exists()
