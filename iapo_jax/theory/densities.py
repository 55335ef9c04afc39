"""The tilted density f(u) = exp(Phi(u)/beta) / Z of a calibrated reward, with its CDF, on a grid.

Under pi_ref the calibrated reward u is Uniform[0, 1], so a policy tilted by a function of u is fully
described by f on [0, 1], whatever the prompt, model or reward. Normalisation happens in log space
(subtract the largest exponent first), so exp(Phi/beta) never overflows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from iapo_jax.theory.quadrature import Grid, cumulative, end_mass, refine, unresolved_panels

END_MASS_LIMIT = 1e-9  # more probability than this in an end panel means the grid is too shallow


@dataclass(frozen=True, eq=False)
class Density:
    grid: Grid
    log_f: np.ndarray  # log f at the nodes
    f: np.ndarray
    cdf: np.ndarray  # F(u) = int_0^u f, accurate where small
    sf: np.ndarray  # 1 - F(u) = int_u^1 f, accurate where small

    @property
    def log_cdf(self) -> np.ndarray:
        """log F, through log1p(-sf) where F is near 1 so it keeps full relative accuracy."""
        with np.errstate(divide="ignore"):
            return np.where(self.sf < 0.5, np.log1p(-self.sf), np.log(self.cdf))

    @property
    def log_sf(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.where(self.cdf < 0.5, np.log1p(-self.cdf), np.log(self.sf))


def density_from_log_tilt(grid: Grid, log_tilt: np.ndarray) -> Density:
    """Normalises exp(log_tilt) on the grid; raises if the grid cannot resolve it."""
    log_tilt = np.asarray(log_tilt, dtype=np.float64)
    if not np.all(np.isfinite(log_tilt)):
        raise ValueError("the tilt Phi(u)/beta is not finite on (0, 1); check beta and t")
    shifted = np.exp(log_tilt - log_tilt.max())
    z = float(np.dot(grid.weights, shifted))
    f = shifted / z
    log_f = log_tilt - log_tilt.max() - np.log(z)
    if end_mass(grid, f) > END_MASS_LIMIT:
        raise ValueError(
            "the tilted density is concentrated too close to u = 0 or 1 for the quadrature grid "
            f"(outermost panels of width {grid.depth:g} hold {end_mass(grid, f):.2g} of its mass); "
            "use a smaller target KL or a larger beta"
        )
    cdf, sf = cumulative(grid, f)
    return Density(grid, log_f, f, np.clip(cdf, 0.0, 1.0), np.clip(sf, 0.0, 1.0))


def uniform_density(grid: Grid) -> Density:
    """pi_ref itself: f = 1."""
    return density_from_log_tilt(grid, np.zeros_like(grid.u))


def resolved_density(grid: Grid, log_tilt_on: Callable[[Grid], np.ndarray]) -> Density:
    """density_from_log_tilt, splitting the panels that do not resolve f until all do."""
    while True:
        d = density_from_log_tilt(grid, log_tilt_on(grid))
        flags = unresolved_panels(grid, d.f)
        if not flags.any():
            return d
        grid = refine(grid, flags)
