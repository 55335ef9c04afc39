"""Phi(u) / beta on the grid for each closed-form transform, shifted by a constant so it stays finite.

Only differences of Phi matter (the density is normalised), so each tilt is shifted to vanish at
u = 1, where every increasing transform puts its mass, and written so that it neither overflows nor
cancels there: exp(t u)/beta becomes exp(t - log beta) * expm1(-t s). Its rounding error is then
relative to its distance from zero, hence negligible wherever the density is not.
"""

from __future__ import annotations

import numpy as np

from iapo_jax.theory.quadrature import Grid


def log_tilt(grid: Grid, transform: str, log_beta: float, t: float | None = None) -> np.ndarray:
    """(Phi(u) - const) / beta at the grid nodes, for beta = exp(log_beta).

    Extreme beta may overflow to inf here; the density built from it rejects non-finite tilts.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return _log_tilt(grid, transform, log_beta, t)


def _log_tilt(grid: Grid, transform: str, log_beta: float, t: float | None) -> np.ndarray:
    inv_beta = np.exp(-log_beta)
    if transform == "identity":  # (u - 1) / beta
        return -grid.s * inv_beta
    if transform == "log":  # log(u) / beta
        return grid.log_u * inv_beta
    if transform == "logit":  # log(u / (1 - u)) / beta
        return (grid.log_u - grid.log_s) * inv_beta
    if transform == "exp":  # (exp(t u) - exp(t)) / beta
        return np.exp(t - log_beta) * np.expm1(-t * grid.s)
    if transform == "negexp":  # (-exp(-t u) + exp(-t)) / beta
        near_top = -np.exp(-t - log_beta) * np.expm1(t * grid.s)
        far = -np.exp(-t * grid.u - log_beta)  # where exp(-t) is negligible next to exp(-t u)
        return np.where(t * grid.s < 700.0, near_top, far)
    raise ValueError(f"no closed-form tilt for transform {transform!r}")
