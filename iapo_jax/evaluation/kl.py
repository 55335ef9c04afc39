"""KL(pi || pi_ref) estimated from samples of pi with log-probs under both policies."""

from __future__ import annotations

import numpy as np


def sample_kl(logp, ref_logp, mask) -> tuple[float, float]:
    """Mean and standard error over sequences of sum_t (log pi - log pi_ref) (the k1 estimator).

    Unbiased for the sequence-level KL when the tokens are sampled from pi at temperature 1 with
    no filtering, which is how the evaluation samples.
    """
    logp, ref_logp, mask = (np.asarray(x, dtype=np.float64) for x in (logp, ref_logp, mask))
    per_seq = np.sum((logp - ref_logp) * mask, axis=-1).reshape(-1)
    se = per_seq.std(ddof=1) / np.sqrt(len(per_seq)) if len(per_seq) > 1 else float("nan")
    return float(per_seq.mean()), float(se)
