"""How good is a prefix scorer: its error by prefix length, and what it buys in blockwise CD.

- ``mse_by_prefix_length``: mean squared error of V([x, y^t]) against the final reward r(x, y) on
  held-out rollouts, overall and per bucket of prefix length t, next to the error of the best
  constant (the training mean), which a scorer that learned nothing would match.
- ``blockwise_win_rate``: the win rate against pi_ref of blockwise CD (K candidates of M tokens,
  guided by the scorer) on held-out prompts, under the reward the scorer was trained for, with a
  bootstrap interval over prompts (``iapo_jax.evaluation``; ties count one half).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_EDGES = (0, 1, 4, 8, 16, 32, 64, 128)


def mse_by_prefix_length(values, rewards, lengths, edges: Sequence[int] | None = None,
                         baseline: float | None = None) -> dict:
    """values [B, R+1] (prefix t = 0..R), rewards [B], lengths [B] -> metrics.

    Returns {"mse", "baseline_mse", "buckets": [{"t_from", "t_to", "prefixes", "mse",
    "baseline_mse"}, ...]}; bucket [a, b) counts prefixes with a <= t < b (the last is open).
    baseline: the constant prediction compared against (default: the mean of `rewards`).
    """
    values = np.asarray(values, np.float64)
    rewards = np.asarray(rewards, np.float64)
    lengths = np.asarray(lengths)
    if values.ndim != 2 or values.shape[0] != rewards.shape[0] or lengths.shape != rewards.shape:
        raise ValueError(f"values must be [rows, R+1] with one reward and length per row; got {values.shape}, "
                         f"{rewards.shape}, {lengths.shape}")
    edges = list(DEFAULT_EDGES if edges is None else edges)
    if sorted(set(edges)) != edges or edges[0] != 0:
        raise ValueError(f"edges must be strictly increasing and start at 0, got {edges}")
    base = float(np.mean(rewards)) if baseline is None else float(baseline)
    t = np.arange(values.shape[1])[None, :]
    real = t <= lengths[:, None]
    err = np.square(values - rewards[:, None])
    base_err = np.broadcast_to(np.square(base - rewards)[:, None], err.shape)
    buckets = []
    for lo, hi in zip(edges, edges[1:] + [None]):
        sel = real & (t >= lo) & ((t < hi) if hi is not None else True)
        if not sel.any():
            continue
        buckets.append({"t_from": lo, "t_to": hi if hi is not None else int(values.shape[1]),
                        "prefixes": int(sel.sum()), "mse": float(err[sel].mean()),
                        "baseline_mse": float(base_err[sel].mean())})
    return {"mse": float(err[real].mean()), "baseline_mse": float(base_err[real].mean()),
            "prefixes": int(real.sum()), "buckets": buckets}


def blockwise_win_rate(reference, scorer, tokenizer, prompts: Sequence[str], reward, *, k: int = 4,
                       block_size: int = 4, max_new_tokens: int = 24, samples: int = 2,
                       reference_samples: int = 4, key: int = 0, temperature: float = 1.0,
                       num_resamples: int = 2000, confidence: float = 0.95) -> dict:
    """Win rate W_r(blockwise CD > pi_ref) on `prompts`, with a bootstrap interval over prompts.

    Draws `samples` CD responses and `reference_samples` plain pi_ref responses per prompt, scores
    all with `reward`, and compares them per prompt (ties one half). Also reports the mean rewards
    and the mean KL bound (log K - (K-1)/K) * ceil(L / M) of the CD responses.
    """
    from iapo_jax.decoding.blockwise import blockwise_cd
    from iapo_jax.decoding.sampler import sample
    from iapo_jax.evaluation import bootstrap_win_rate

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
