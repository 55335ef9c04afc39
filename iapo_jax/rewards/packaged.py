"""Adapters for reward scorers that ship in PyPI packages and work offline.

All of them score the response text only (the prompt is checked for batch shape but unused).
The third-party packages live in the optional ``rewards`` extra and are imported when a scorer
is built, so a missing package fails at configuration time, not in the middle of a run.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import numpy as np

from iapo_jax.rewards.base import check_batch, check_scores
from iapo_jax.rewards.registry import register_reward


def _require(module: str, pip_name: str, reward: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"reward {reward!r} needs the package {pip_name!r}, which is not installed ({err}); "
            "install the optional scorers with: pip install -e .[rewards]"
        ) from err


@register_reward("harmlessness")
class Harmlessness:
    """1 - P(offensive) from alt-profanity-check's linear classifier; in [0, 1]."""

    name = "harmlessness"

    def __init__(self):
        self._predict_prob = _require(
            "profanity_check", "alt-profanity-check", self.name
        ).predict_prob

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        n = check_batch(prompts, responses, self.name)
        if n == 0:
            return np.zeros((0,), np.float32)
        return check_scores(1.0 - np.asarray(self._predict_prob(list(responses))), n, self.name)


@register_reward("vader")
class Vader:
    """VADER compound sentiment in [-1, 1] (rule-based, lexicon + heuristics)."""

    name = "vader"

    def __init__(self):
        module = _require("vaderSentiment.vaderSentiment", "vaderSentiment", self.name)
        self._analyzer = module.SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        n = check_batch(prompts, responses, self.name)
        out = [self._analyzer.polarity_scores(text)["compound"] for text in responses]
        return check_scores(np.asarray(out, np.float32).reshape(n), n, self.name)


@register_reward("textblob")
class TextBlobPolarity:
    """TextBlob pattern-lexicon polarity in [-1, 1]; needs no NLTK downloads."""

    name = "textblob"

    def __init__(self):
        self._blob = _require("textblob", "textblob", self.name).TextBlob

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        n = check_batch(prompts, responses, self.name)
        out = [self._blob(text).sentiment.polarity for text in responses]
        return check_scores(np.asarray(out, np.float32).reshape(n), n, self.name)


@register_reward("length")
class LengthInWords:
    """Number of whitespace-separated words in the response, or -|words - target| with a target.

    Deterministic and dependency-free: the "make responses longer" reward of the CD paper's
    first experiment, and a reward whose optimum is known exactly, for tests.
    """

    name = "length"

    def __init__(self, target: int | None = None):
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
            raise ValueError(
                f"reward 'length': target must be a non-negative integer number of words or None, "
                f"got {target!r}"
            )
        self.target = target

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        n = check_batch(prompts, responses, self.name)
        words = np.asarray([len(text.split()) for text in responses], np.float32).reshape(n)
        if self.target is not None:
            words = -np.abs(words - np.float32(self.target))
        return check_scores(words, n, self.name)
