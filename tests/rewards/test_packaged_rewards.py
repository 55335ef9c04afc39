"""Packaged scorers (alt-profanity-check, VADER, TextBlob) through the reward registry."""

import numpy as np
import pytest

from iapo_jax.rewards import Reward, available_rewards, check_scores, get_reward, register_reward

PROMPTS = ["How was your day?"] * 2


@pytest.mark.parametrize(
    "name, good, bad",
    [
        ("harmlessness", "Thank you, I hope you have a lovely afternoon.", "Shut up, you stupid worthless idiot."),
        ("vader", "I love this, it is a wonderful and happy day!", "I hate this, it is a terrible and awful day."),
        ("textblob", "What a great, beautiful and excellent result.", "What a bad, ugly and terrible result."),
    ],
)
def test_real_scorer_orders_obvious_pairs(name, good, bad):
    reward = get_reward(name)
    assert isinstance(reward, Reward) and reward.name == name
    scores = reward.score(PROMPTS, [good, bad])
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert scores[0] > scores[1] + 0.3
    low, high = (0.0, 1.0) if name == "harmlessness" else (-1.0, 1.0)
    assert np.all((scores >= low) & (scores <= high))


def test_neutral_text_ties_at_zero_on_lexicon_rewards():
    # Why calibration needs the mid-rank tie rule: neutral lines score exactly 0.
    neutral = ["The file is in the folder.", "Open the door.", "It is Tuesday."]
    for name in ("vader", "textblob"):
        np.testing.assert_array_equal(get_reward(name).score(["q"] * 3, neutral), 0.0)


def test_length_reward():
    plain, target = get_reward("length"), get_reward("length", target=3)
    responses = ["one two three", "  a  b ", "", "w " * 10]
    np.testing.assert_array_equal(plain.score(["p"] * 4, responses), [3, 2, 0, 10])
    np.testing.assert_array_equal(target.score(["p"] * 4, responses), [0, -1, -3, -7])
    with pytest.raises(ValueError, match="non-negative integer"):
        get_reward("length", target=-2)


@pytest.mark.parametrize("name", ["harmlessness", "vader", "textblob", "length"])
def test_batch_errors(name):
    reward = get_reward(name)
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        reward.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="single string"):
        reward.score("a", "x")
    with pytest.raises(TypeError, match="response 1 is int"):
        reward.score(["a", "b"], ["x", 3])
    assert reward.score([], []).shape == (0,)


def test_check_scores_rejects_wrong_length_and_nan():
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        check_scores([0.1, 0.2, 0.3], 2, "mine")
    with pytest.raises(ValueError, match="1 non-finite score.*index 1"):
        check_scores([0.1, np.nan], 2, "mine")
    assert check_scores([1, 2], 2, "mine").dtype == np.float32


def test_registry():
    assert {"harmlessness", "vader", "textblob", "length"} <= set(available_rewards())
    with pytest.raises(ValueError, match="unknown reward 'nope'; available rewards: .*vader"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("vader")(type("Other", (), {}))


def test_missing_optional_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "textblob", None)  # makes `import textblob` fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[rewards\]"):
        get_reward("textblob")
