"""Soft best-of-N on a calibrated reward: the served law, its win rate and its stationarity reward.

Soft-BoN_N,lam draws N responses from pi and serves response i with probability
exp(u_i/lam) / sum_j exp(u_j/lam). By the Gumbel-max trick that is the argmax of u_i + lam G_i with
G_i i.i.d. standard Gumbel (equivalently, 1/x = int_0^inf exp(-s x) ds with s = exp(-w/lam)). So,
for a policy with calibrated-reward density f and CDF F:

    M(w) = P(V + lam G < w)     = int_0^1 f(v) K(w - v) dv,      K(z) = exp(-exp(-z/lam))
    g(u) = N f(u) E_G[M(u + lam G)^(N-1)] = N f(u) int p(w - u) M(w)^(N-1) dw,   p = K'

g is the served density. lam -> 0 gives BoN's N f F^(N-1); lam -> inf gives f. The win rate is
W = int g_pi(u) G_ref(u) du with G_ref the served CDF under pi_ref, and its derivative in f(y),
the reward whose tilt is the exact optimum's fixed point (InfAlign's theorem for this T), is

    R(y) = N h(y) E_G[M(y + lam G)^(N-1)] + N (N-1) int A(w) M(w)^(N-2) K(w - y) dw,
    A(w) = int f(u) h(u) p(w - u) du,   h = G_ref,

which for lam -> 0 reduces to BoN's -N^2 int_y^1 F^(N-1) v^(N-1) dv (up to a constant).

Numerics: the kernels have width lam, so the u grid is split until no panel is wider than
PANEL_LAMS * lam, and w runs over uniform Gauss-Legendre panels on [-W_LEFT lam, 1 + W_RIGHT lam],
where the Gumbel tails have fallen below 1e-17. The kernel matrices depend only on (grid, lam) and
are cached, so each fixed-point step costs four matrix-vector products.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numpy.polynomial import legendre

from iapo_jax.theory.densities import Density
from iapo_jax.theory.quadrature import Grid, cumulative, refine

LAM_MIN = 5e-3  # below this the w grid needs > 200 panels and the kernels > 100 MB: use bon
LAM_MAX = 1e6  # beyond this soft-BoN is plain sampling to within 1e-6
PANEL_LAMS = 2.0  # widest panel, in units of lam: 16 nodes resolve the Gumbel kernel to ~1e-12
W_LEFT = 5.0  # p(z) < 1e-60 for z < -5 lam (double-exponential left tail)
W_RIGHT = 40.0  # p(z) < 1e-17 for z > 40 lam (exponential right tail)
W_ORDER = 16


def check_lam(lam) -> float:
    """lam as a float; raises ValueError naming the problem and the fix."""
    number = isinstance(lam, (int, float, np.floating)) and not isinstance(lam, bool)
    if not number or not math.isfinite(lam) or lam <= 0:
        raise ValueError(
            f"soft best-of-N needs a finite selection temperature lam > 0, got {lam!r}; "
            "lam -> 0 is best-of-N (use procedure bon), large lam is plain sampling"
        )
    if not LAM_MIN <= lam <= LAM_MAX:
        raise ValueError(
            f"lam={lam:g} is outside the analytic tool's range [{LAM_MIN:g}, {LAM_MAX:g}]; below it "
            "use procedure bon (soft-BoN is BoN to within O(lam)), above it procedure sampling"
        )
    return float(lam)


def soft_bon_grid(grid: Grid, lam: float) -> Grid:
    """``grid`` with every panel split until none is wider than PANEL_LAMS * lam."""
    while True:
        flags = 2.0 * grid.half_widths > PANEL_LAMS * lam
        if not flags.any():
            return grid
        grid = refine(grid, flags)


def ensure_resolved(grid: Grid, lam: float | None) -> Grid:
    """The grid itself when its panels already resolve width-lam kernels (or lam is None)."""
    return grid if lam is None else soft_bon_grid(grid, lam)


class Kernels:
    """K(w_j - u_i) and p(w_j - u_i) on one (u grid, lam), with the w nodes' weights."""

    def __init__(self, grid: Grid, lam: float):
        lo, hi = -W_LEFT * lam, 1.0 + W_RIGHT * lam
        panels = max(1, math.ceil((hi - lo) / (PANEL_LAMS * lam)))
        x, w = legendre.leggauss(W_ORDER)
        edges = np.linspace(lo, hi, panels + 1)
        half = np.diff(edges)[:, None] / 2.0
        self.w = (edges[:-1, None] + half * (1.0 + x[None, :])).ravel()
        self.ww = (half * w[None, :]).ravel()
        z = (self.w[:, None] - grid.u[None, :]) / lam  # [W, U]
        with np.errstate(over="ignore"):
            e = np.exp(-z)
            self.K = np.exp(-e)
            self.p = np.exp(-z - e) / lam
        self.grid, self.lam = grid, lam


@lru_cache(maxsize=2)
def kernels(grid: Grid, lam: float) -> Kernels:
    return Kernels(grid, lam)


def _check_grid(grid: Grid, lam: float) -> None:
    if 2.0 * grid.half_widths.max() > PANEL_LAMS * lam * (1 + 1e-12):
        raise ValueError(
            f"the quadrature grid is too coarse for soft best-of-N at lam={lam:g}; "
            "build it with soft_bon_grid(grid, lam)"
        )


def selection_factor(d: Density, n: int, lam: float) -> np.ndarray:
    """Q(u) = E_G[M(u + lam G)^(N-1)]: the served density is N f Q."""
    _check_grid(d.grid, lam)
    k = kernels(d.grid, lam)
    m = k.K @ (d.grid.weights * d.f)
    return k.p.T @ (k.ww * m ** (n - 1))


def served_density(d: Density, n: int, lam: float) -> np.ndarray:
    """g(u), the density of the served response's calibrated reward, at the grid nodes."""
    if n == 1:
        return d.f
    return n * d.f * selection_factor(d, n, lam)


def served_cdf(d: Density, n: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(CDF, 1 - CDF) of the served calibrated reward."""
    cdf, sf = cumulative(d.grid, served_density(d, n, lam))
    return np.clip(cdf, 0.0, 1.0), np.clip(sf, 0.0, 1.0)


@lru_cache(maxsize=4)
def _reference_cdf(grid: Grid, n: int, lam: float) -> np.ndarray:
    from iapo_jax.theory.densities import uniform_density

    return served_cdf(uniform_density(grid), n, lam)[0]


def reference_cdf(grid: Grid, n: int, lam: float) -> np.ndarray:
    """G_ref: the served CDF of soft-BoN(pi_ref) at the grid nodes."""
    return _reference_cdf(grid, n, lam)


def win_rate(d: Density, n: int, lam: float) -> float:
    """W(softBoN(pi) > softBoN(pi_ref)) for the same N and lam (ties have probability zero)."""
    h = reference_cdf(d.grid, n, lam)
    return float(np.dot(d.grid.weights, served_density(d, n, lam) * h))


def stationarity_reward(d: Density, n: int, lam: float) -> np.ndarray:
    """R(u) = dW/df(u) at the grid nodes (any constant offset is irrelevant after normalising)."""
    g = d.grid
    h = reference_cdf(g, n, lam)
    if n == 1:
        return h
    k = kernels(g, lam)
    m = k.K @ (g.weights * d.f)
    q = k.p.T @ (k.ww * m ** (n - 1))
    a = k.p @ (g.weights * d.f * h)
    second = k.K.T @ (k.ww * a * m ** (n - 2))
    return n * h * q + n * (n - 1) * second
