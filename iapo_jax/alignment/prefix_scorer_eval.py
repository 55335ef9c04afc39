"""How good is a prefix scorer: its error by prefix length.

``mse_by_prefix_length``: mean squared error of V([x, y^t]) against the final reward r(x, y) on
held-out rollouts, overall and per bucket of prefix length t, next to the error of the best
constant (the training mean), which a scorer that learned nothing would match. What the scorer
buys in blockwise CD is measured by ``evaluation.blockwise_win_rate``.
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
