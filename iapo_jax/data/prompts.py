"""Chat prompt sets from chatterbot-corpus (PyPI, BSD): real chat-style user questions, offline.

The package ships ``chatterbot_corpus/data/<language>/<category>.yml``; each file has
``conversations:``, a list of lists whose first item is what a user says (the rest are bot replies
or alternative replies). Prompts are the distinct first items. Splits are by category, so eval
prompts come from topics never seen in training. Categories are named by file stem
(``tech_support``, ``trivia``, ...).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import random
from pathlib import Path
from typing import Iterable

import yaml

log = logging.getLogger(__name__)

# About a quarter of the distinct English questions, from topics disjoint from training.
EVAL_CATEGORIES = frozenset(
    {"food", "history", "literature", "movies", "politics", "psychology", "science", "sports"}
)


def corpus_dir(language: str = "english") -> Path:
    """The installed ``chatterbot_corpus/data/<language>`` folder."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("chat prompts need the package 'chatterbot-corpus': pip install chatterbot-corpus")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    if not path.is_dir():
        available = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        raise ValueError(f"chatterbot-corpus has no language {language!r}; available: {', '.join(available)}")
    return path


@functools.lru_cache(maxsize=4)
def _questions_by_category(language: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(corpus_dir(language).glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        seen: dict[str, None] = {}  # ordered set
        for conversation in doc.get("conversations") or []:
            # A few entries are malformed (a bare string instead of a list): skip them.
            if isinstance(conversation, list) and conversation and isinstance(conversation[0], str):
                question = " ".join(conversation[0].split())
                if question:
                    seen.setdefault(question, None)
        out[path.stem] = tuple(seen)
    return out


def available_categories(language: str = "english") -> list[str]:
    return sorted(_questions_by_category(language))


def load_chat_prompts(
    split: str = "train",
    categories: Iterable[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    eval_categories: Iterable[str] = EVAL_CATEGORIES,
    language: str = "english",
) -> list[str]:
    """Distinct user questions of one split, shuffled deterministically by ``seed``.

    split: 'train' (categories not in ``eval_categories``), 'eval' (those in it) or 'all'.
    categories: restrict to these categories (file stems) within the split.
    limit: keep the first ``limit`` prompts after the shuffle.
    A question that occurs in both an eval and a train category is kept in eval only.
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    by_category = _questions_by_category(language)
    known = set(by_category)
    eval_set = set(eval_categories)
    unknown = sorted((eval_set | set(categories or ())) - known)
    if unknown:
        raise ValueError(
            f"unknown chat prompt categories {unknown}; available: {', '.join(sorted(known))}"
        )
    in_split = {
        "train": known - eval_set,
        "eval": known & eval_set,
        "all": known,
    }[split]
    chosen = in_split if categories is None else in_split & set(categories)
    if not chosen:
        raise ValueError(
            f"no categories left for split {split!r} with categories={sorted(categories or [])}: "
            f"eval categories are {sorted(eval_set & known)}, the others are train"
        )
    held_out = {q for c in eval_set & known for q in by_category[c]} if split == "train" else set()
    prompts: dict[str, None] = {}
    for category in sorted(chosen):
        for question in by_category[category]:
            if question not in held_out:
                prompts.setdefault(question, None)
    out = list(prompts)
    random.Random(seed).shuffle(out)
    if limit is not None:
        if limit > len(out):
            log.warning("limit=%d exceeds the %d prompts available; returning all", limit, len(out))
        out = out[:limit]
    return out
