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
    """Per-row bound (log K - (K-1)/K) * L / M for blockwise CD; L = decoded tokens of that row."""
    if int(block_size) < 1:
        raise ValueError(f"block size M must be at least 1, got {block_size}.")
    return best_of_k_kl_bound(k) * np.asarray(lengths, np.float64) / block_size
