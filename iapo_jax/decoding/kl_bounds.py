"""KL bounds reported with best-of-K and blockwise controlled decoding (algorithms.md section 5)."""

from __future__ import annotations

import math

import numpy as np


def best_of_k_kl_bound(k: int) -> float:
    """KL(best-of-K || base) <= log K - (K-1)/K (an upper bound; exact for continuous rewards)."""
    if int(k) < 1:
        raise ValueError(f"K must be at least 1, got {k}.")
    return math.log(k) - (k - 1) / k


def blockwise_kl_bound(k: int, lengths, block_size: int) -> np.ndarray:
    """Per-row bound (log K - (K-1)/K) * ceil(L / M) for blockwise CD; L = decoded tokens of that row.

    Each kept block is one best-of-K selection and adds at most log K - (K-1)/K. A response that
    ends (EOS or the length limit) inside a block still needed that block's selection, so a row
    of L tokens made ceil(L / M) selections; algorithms.md's L / M undercounts a partial last block.
    """
    if int(block_size) < 1:
        raise ValueError(f"block size M must be at least 1, got {block_size}.")
    lengths = np.asarray(lengths, np.float64)
    if np.any(lengths < 0):
        raise ValueError(f"decoded lengths must be non-negative, got min {lengths.min()}.")
    return best_of_k_kl_bound(k) * np.ceil(lengths / int(block_size))
