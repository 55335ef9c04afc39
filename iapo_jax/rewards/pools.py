"""Sampling reference pools: m responses per prompt from pi_ref, scored once and kept sorted.

Sampling goes in rounds of `per_call` responses per prompt, so building a pool reuses the very
program that RL rollouts compile (same rows and branch count) instead of compiling a new one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from iapo_jax.decoding.engine import sample
from iapo_jax.rewards.base import check_scores
from iapo_jax.rewards.calibration import ReferencePool


def sample_reference_pool(
    model,
    tokenizer,
    reward,
    prompts: Sequence[str],
    *,
    m: int,
    max_new_tokens: int,
    key=0,
    per_call: int | None = None,
    temperature: float = 1.0,
    progress=None,
    keep_responses: bool = True,
) -> ReferencePool:
    """m reference samples per prompt, scored with `reward`; per_call must divide m."""
    prompts = list(prompts)
    if m < 2:
        raise ValueError(f"a reference pool needs at least 2 samples per prompt (got m={m}); use m >= 16")
    per_call = m if per_call is None else int(per_call)
    if per_call < 1 or m % per_call:
        raise ValueError(f"per_call ({per_call}) must be a positive divisor of m ({m})")
    key = jax.random.key(key) if isinstance(key, int) else key
    rounds = range(m // per_call)
    scores, responses = [], []
    for r in (progress(rounds) if progress else rounds):
        out = sample(model, prompts, max_new_tokens=max_new_tokens, n=per_call,
                     key=jax.random.fold_in(key, r), tokenizer=tokenizer, temperature=temperature)
        texts = list(out.texts)
        rep = [p for p in prompts for _ in range(per_call)]
        s = check_scores(reward.score(rep, texts), len(texts), getattr(reward, "name", "reward"))
        scores.append(s.reshape(len(prompts), per_call))
        responses.append(np.asarray(texts, dtype=object).reshape(len(prompts), per_call))
    pool_scores = np.concatenate(scores, axis=1)
    pool_texts = np.concatenate(responses, axis=1).tolist() if keep_responses else None
    return ReferencePool.build(prompts, pool_scores, responses=pool_texts)
