"""Chat prompt sets from the installed chatterbot-corpus package."""

import pytest
import yaml

from iapo_jax.data.prompts import EVAL_CATEGORIES, available_categories, corpus_dir, load_chat_prompts


def test_splits_are_disjoint_and_cover_all():
    train, evals, everything = (load_chat_prompts(s) for s in ("train", "eval", "all"))
    assert not set(train) & set(evals)
    assert set(train) | set(evals) == set(everything)
    assert len(train) == len(set(train)) and len(evals) == len(set(evals))
    assert len(train) > 400 and len(evals) > 100  # 2,026 conversations, about 750 distinct questions
    assert all(isinstance(p, str) and p.strip() == p and p for p in everything)


def test_prompts_are_first_turns_of_the_yaml_files():
    with open(corpus_dir() / "trivia.yml", encoding="utf-8") as f:
        raw = yaml.safe_load(f)["conversations"]
    firsts = {c[0] for c in raw if isinstance(c, list)}
    replies = {c[1] for c in raw if isinstance(c, list)}
    trivia = load_chat_prompts("train", categories=["trivia"])
    assert "Who was the 37th President of the United States?" in trivia
    assert set(trivia) <= firsts and not set(trivia) & (replies - firsts)
    # tech_support repeats 10 questions across 1,050 conversations: they are deduplicated.
    assert len(load_chat_prompts("train", categories=["tech_support"])) == 10


def test_categories_select_within_split():
    science = load_chat_prompts("eval", categories=["science"])
    assert set(science) <= set(load_chat_prompts("eval"))
    assert "science" in EVAL_CATEGORIES and "trivia" not in EVAL_CATEGORIES
    custom = load_chat_prompts("eval", eval_categories=["trivia"])
    assert set(custom) == set(load_chat_prompts("all", categories=["trivia"]))


def test_deterministic_shuffle_and_limit():
    a = load_chat_prompts("train", seed=3)
    assert a == load_chat_prompts("train", seed=3)
    b = load_chat_prompts("train", seed=4)
    assert a != b and sorted(a) == sorted(b)
    assert load_chat_prompts("train", seed=3, limit=7) == a[:7]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "test"}, "split must be 'train', 'eval' or 'all'"),
        ({"categories": ["astrology"]}, r"unknown chat prompt categories \['astrology'\]"),
        ({"split": "train", "categories": ["science"]}, "no categories left for split 'train'"),
        ({"limit": 0}, "positive integer"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_chat_prompts(**kwargs)


def test_available_categories():
    cats = available_categories()
    assert {"ai", "trivia", "tech_support", "science"} <= set(cats)
    assert set(EVAL_CATEGORIES) <= set(cats)
