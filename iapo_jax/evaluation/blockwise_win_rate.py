"""What a prefix scorer buys in blockwise CD: its win rate against pi_ref on held-out prompts.

Blockwise CD (K candidates of M tokens, guided by the scorer) is scored under the reward the scorer
was trained for and compared with plain pi_ref samples per prompt, with a bootstrap interval over
prompts (ties count one half).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from iapo_jax.decoding.blockwise import blockwise_cd
from iapo_jax.decoding.engine import sample
from iapo_jax.evaluation.win_rates import bootstrap_win_rate


def blockwise_win_rate(reference, scorer, tokenizer, prompts: Sequence[str], reward, *, k: int = 4,
                       block_size: int = 4, max_new_tokens: int = 24, samples: int = 2,
                       reference_samples: int = 4, key: int = 0, temperature: float = 1.0,
                       num_resamples: int = 2000, confidence: float = 0.95) -> dict:
    """Win rate W_r(blockwise CD > pi_ref) on `prompts`, with a bootstrap interval over prompts.

    Draws `samples` CD responses and `reference_samples` plain pi_ref responses per prompt, scores
    all with `reward`, and compares them per prompt (ties one half). Also reports the mean rewards
    and the mean KL bound (log K - (K-1)/K) * ceil(L / M) of the CD responses.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no evaluation prompts given")
    if samples < 1 or reference_samples < 1:
        raise ValueError(f"samples and reference_samples must be >= 1 (got {samples}, {reference_samples})")
    p = len(prompts)
    rep = [q for q in prompts for _ in range(samples)]
    cd = blockwise_cd(reference, rep, scorer, k=k, block_size=block_size, max_new_tokens=max_new_tokens,
                      key=key, temperature=temperature, tokenizer=tokenizer)
    cd_scores = np.asarray(reward.score(rep, list(cd.texts)), np.float64).reshape(p, samples)
    ref = sample(reference, prompts, n=reference_samples, max_new_tokens=max_new_tokens, key=key + 1,
                 temperature=temperature, tokenizer=tokenizer)
    ref_rep = [q for q in prompts for _ in range(reference_samples)]
    ref_scores = np.asarray(reward.score(ref_rep, list(ref.texts)), np.float64).reshape(p, reference_samples)
    wr = bootstrap_win_rate(cd_scores, ref_scores, "sampling", 1, num_resamples=num_resamples,
                            confidence=confidence, seed=key)
    return {"win_rate": wr.win_rate, "ci_low": wr.ci_low, "ci_high": wr.ci_high, "prompts": p,
            "cd_samples": samples, "reference_samples": reference_samples, "k": k, "block_size": block_size,
            "cd_reward_mean": float(cd_scores.mean()), "reference_reward_mean": float(ref_scores.mean()),
            "kl_bound_mean": float(np.mean(cd.kl_bound)),
            "cd_response_tokens": float(np.mean(np.asarray(cd.lengths))),
            "reference_response_tokens": float(np.mean(np.asarray(ref.lengths)))}
