"""The reward protocol: a batched scorer of (prompt, response) pairs, higher is better."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Reward(Protocol):
    """Anything with a ``name`` and a batched ``score``.

    ``score(prompts, responses)`` takes two equally long sequences of strings and returns a
    float32 array of shape [n] with one finite score per pair. Implemented by the packaged
    scorers (``packaged.py``) and by JAX reward models.
    """

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


def check_batch(prompts: Sequence[str], responses: Sequence[str], name: str) -> int:
    """Checks a scoring batch before any compute and returns its size n."""
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError(
            f"reward {name!r}: prompts and responses must be sequences of strings, got a single "
            "string; wrap it in a list"
        )
    n, n_resp = len(prompts), len(responses)
    if n != n_resp:
        raise ValueError(
            f"reward {name!r}: got {n} prompts but {n_resp} responses; pass one prompt per "
            "response (repeat a prompt for each of its responses)"
        )
    for kind, seq in (("prompt", prompts), ("response", responses)):
        for i, text in enumerate(seq):
            if not isinstance(text, str):
                raise TypeError(
                    f"reward {name!r}: {kind} {i} is {type(text).__name__}, expected str; "
                    "decode token ids to text before scoring"
                )
    return n


def check_scores(scores, n: int, name: str) -> np.ndarray:
    """Returns ``scores`` as a float32 [n] array, or raises if its shape is wrong or it has NaN/inf."""
    arr = np.asarray(scores, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(
            f"reward {name!r} returned scores of shape {arr.shape}, expected ({n},): a reward "
            "must return exactly one score per (prompt, response) pair"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"reward {name!r} returned {int(bad.sum())} non-finite score(s) (first at index "
            f"{first}: {arr[first]}); fix the scorer or drop those responses before scoring"
        )
    return arr
