"""KL(pi || pi_ref) estimated from samples of pi with log-probs under both policies."""

from __future__ import annotations

import numpy as np


def _clusters(num_rows: int, samples_per_prompt, prompt_ids) -> np.ndarray | None:
    """Integer cluster label per sequence, or None for independent sequences."""
    if samples_per_prompt is not None and prompt_ids is not None:
        raise ValueError("give either samples_per_prompt or prompt_ids, not both")
    if samples_per_prompt is not None:
        k = int(samples_per_prompt)
        if k < 1 or num_rows % k:
            raise ValueError(
                f"samples_per_prompt={samples_per_prompt} must be a positive divisor of the {num_rows} "
                "sequences (rows ordered prompt by prompt); pass prompt_ids for any other order")
        return np.arange(num_rows) // k
    if prompt_ids is not None:
        ids = np.asarray(prompt_ids).reshape(-1)
        if len(ids) != num_rows:
            raise ValueError(f"prompt_ids has {len(ids)} entries for {num_rows} sequences; give one "
                             "prompt id per sequence")
        return np.unique(ids, return_inverse=True)[1].reshape(-1)
    return None


def _sequence_kls(logp, ref_logp, mask) -> np.ndarray:
    """sum_t (log pi - log pi_ref) over each sequence's real tokens, in float64."""
    logp, ref_logp, mask = (np.asarray(x, dtype=np.float64) for x in (logp, ref_logp, mask))
    return np.sum((logp - ref_logp) * mask, axis=-1).reshape(-1)


def sample_kl(logp, ref_logp, mask, samples_per_prompt: int | None = None,
              prompt_ids=None) -> tuple[float, float]:
    """Mean and standard error over sequences of sum_t (log pi - log pi_ref) (the k1 estimator).

    Unbiased for the sequence-level KL when the tokens are sampled from pi at temperature 1 with
    no filtering, which is how the evaluation samples.

    Samples of the same prompt are correlated (their KLs share the prompt's level), so with
    several samples per prompt the i.i.d. standard error is too small. Given the prompt of each
    sequence (`samples_per_prompt` for rows ordered prompt by prompt, or `prompt_ids`), the SE
    is the cluster-robust one over prompts: with S_i the sum and n_i the count of prompt i's
    sequences, mean = sum S_i / N and SE^2 = P / (P - 1) * sum_i (S_i - n_i mean)^2 / N^2, which
    for equal n_i is the standard error of the P per-prompt means. Without either, sequences are
    treated as independent (one sample per prompt).
    """
    per_seq = _sequence_kls(logp, ref_logp, mask)
    mean = float(per_seq.mean())
    cluster = _clusters(len(per_seq), samples_per_prompt, prompt_ids)
    if cluster is None:
        se = per_seq.std(ddof=1) / np.sqrt(len(per_seq)) if len(per_seq) > 1 else float("nan")
        return mean, float(se)
    num = int(cluster.max()) + 1
    if num < 2:
        return mean, float("nan")
    sums = np.bincount(cluster, weights=per_seq, minlength=num)
    counts = np.bincount(cluster, minlength=num)
    se = np.sqrt(num / (num - 1) * np.sum((sums - counts * mean) ** 2)) / len(per_seq)
    return mean, float(se)


def per_prompt_kl(logp, ref_logp, mask, prompt_ids) -> np.ndarray:
    """The k1 KL estimate of each prompt (mean over its sequences), ordered by prompt id."""
    per_seq = _sequence_kls(logp, ref_logp, mask)
    cluster = _clusters(len(per_seq), None, prompt_ids)
    num = int(cluster.max()) + 1
    return np.bincount(cluster, weights=per_seq, minlength=num) / np.bincount(cluster, minlength=num)
