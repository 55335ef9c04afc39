"""Composite Gauss-Legendre quadrature on [0, 1], graded geometrically towards both ends.

Tilted densities of a calibrated reward pile up near u = 1 (large t, small beta) or near u = 0, and
win-rate integrands such as u^(N-1) sharpen as N grows. Panels [x, ratio * x] in u near 0, and in
s = 1 - u near 1, resolve features of every scale with a fixed number of nodes per panel (hp
refinement). Nodes near u = 1 are built from s, so 1 - u never cancels, and the grid can reach
s = 1e-300 where a density is (integrably) singular at an end. Features inside (0, 1), such as the
sharp cut-off of the worst-of-N optimum, are handled by splitting the panels that do not resolve
them (``refine``).

Cumulative integrals int_0^u and int_u^1 at every node come from the exact integration matrix of
the panel's interpolating polynomial, so they are as accurate as the panel quadrature itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.polynomial import legendre

MAX_PANELS = 20000
NOISE_FLOOR = 1e-12  # relative size of Legendre coefficients that rounding alone produces


@dataclass(frozen=True, eq=False)
class Grid:
    """Quadrature nodes on (0, 1), ascending in u, stored panel after panel.

    Panels of the left half are measured in u from 0, those of the right half in s from 1:
    ``left_edges`` and ``right_edges`` both ascend from 0 to 0.5.
    """

    u: np.ndarray  # nodes
    s: np.ndarray  # 1 - u, accurate near u = 1
    log_u: np.ndarray
    log_s: np.ndarray
    weights: np.ndarray
    half_widths: np.ndarray  # per panel
    left_edges: np.ndarray
    right_edges: np.ndarray
    order: int  # nodes per panel

    @property
    def n_panels(self) -> int:
        return self.half_widths.size

    @property
    def depth(self) -> float:
        """Width of the outermost panel at each end."""
        return float(min(self.left_edges[1], self.right_edges[1]))


@lru_cache(maxsize=8)
def _reference_panel(order: int):
    """Nodes, weights, cumulative matrices and coefficient map on [-1, 1].

    left[i, j] = int_{-1}^{x_i} l_j (l_j the Lagrange basis); to_coeffs maps values to Legendre
    coefficients of the interpolating polynomial.
    """
    x, w = legendre.leggauss(order)
    vander = legendre.legvander(x, order - 1)  # P_k(x_i)
    p = legendre.legvander(x, order)
    antider = np.empty((order, order))
    antider[:, 0] = x + 1.0
    for k in range(1, order):  # int_{-1}^x P_k = (P_{k+1} - P_{k-1}) / (2k + 1)
        antider[:, k] = (p[:, k + 1] - p[:, k - 1]) / (2 * k + 1)
    to_coeffs = np.linalg.inv(vander)
    left = antider @ to_coeffs
    right = left[::-1, ::-1]  # reflection x -> -x maps int_{-1}^{x} onto int_{x}^{1}
    return x, w, left, right, to_coeffs


def _distances(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nodes of each panel as distances from the end, measured from the panel edge nearer to them."""
    lo, hi = edges[:-1, None], edges[1:, None]
    return np.where(x < 0, lo + (hi - lo) / 2 * (1 + x), hi - (hi - lo) / 2 * (1 - x))


def grid_from_edges(left_edges: np.ndarray, right_edges: np.ndarray, order: int = 16) -> Grid:
    """A grid from panel edges of both halves (each ascending from 0 to 0.5)."""
    left_edges = np.asarray(left_edges, dtype=np.float64)
    right_edges = np.asarray(right_edges, dtype=np.float64)
    for e in (left_edges, right_edges):
        if e[0] != 0.0 or e[-1] != 0.5 or np.any(np.diff(e) <= 0):
            raise ValueError("panel edges must ascend strictly from 0 to 0.5")
    if left_edges.size + right_edges.size - 2 > MAX_PANELS:
        raise ValueError(
            f"the quadrature grid would need more than {MAX_PANELS} panels; the density is too sharp"
        )
    x, w, _, _, _ = _reference_panel(order)
    u_left = _distances(left_edges, x).ravel()
    s_right = _distances(right_edges, x)[::-1, ::-1].ravel()  # reversed so u ascends
    u = np.concatenate([u_left, 1.0 - s_right])
    s = np.concatenate([1.0 - u_left, s_right])
    log_u = np.concatenate([np.log(u_left), np.log1p(-s_right)])
    log_s = np.concatenate([np.log1p(-u_left), np.log(s_right)])
    half_widths = np.concatenate([np.diff(left_edges), np.diff(right_edges)[::-1]]) / 2.0
    weights = (half_widths[:, None] * w[None, :]).ravel()
    grid = Grid(u, s, log_u, log_s, weights, half_widths, left_edges, right_edges, order)
    for a in (u, s, log_u, log_s, weights, half_widths, left_edges, right_edges):
        a.setflags(write=False)
    return grid


@lru_cache(maxsize=8)
def make_grid(order: int = 16, ratio: float = 2.0, depth: float = 1e-40) -> Grid:
    """The default graded grid; the outermost panel at each end has width about ``depth``."""
    if order < 2 or ratio <= 1.0 or not 0.0 < depth < 0.25:
        raise ValueError(
            f"bad quadrature grid (order={order}, ratio={ratio}, depth={depth}); "
            "use order >= 2, ratio > 1 and 0 < depth < 0.25"
        )
    levels = max(1, math.ceil(math.log(0.5 / depth) / math.log(ratio)))
    edges = np.concatenate([[0.0], 0.5 * ratio ** -np.arange(levels, -1, -1, dtype=np.float64)])
    return grid_from_edges(edges, edges, order)


def integrate(grid: Grid, values: np.ndarray) -> float:
    """int_0^1 values(u) du."""
    return float(np.dot(grid.weights, values))


def cumulative(grid: Grid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int_0^{u_i} values, int_{u_i}^1 values) at every node; each accurate where it is small."""
    _, _, left_m, right_m, _ = _reference_panel(grid.order)
    v = np.asarray(values, dtype=np.float64).reshape(grid.n_panels, grid.order)
    h = grid.half_widths[:, None]
    within_left = h * (v @ left_m.T)
    within_right = h * (v @ right_m.T)
    totals = (grid.weights.reshape(v.shape) * v).sum(axis=1)
    before = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    after = np.concatenate([np.cumsum(totals[::-1])[::-1][1:], [0.0]])
    return (before[:, None] + within_left).ravel(), (after[:, None] + within_right).ravel()


def end_mass(grid: Grid, values: np.ndarray) -> float:
    """int of values over the two outermost panels: how much the grid's ends hold."""
    v = np.asarray(values).reshape(grid.n_panels, grid.order)
    w = grid.weights.reshape(v.shape)
    return float((w[0] * v[0]).sum() + (w[-1] * v[-1]).sum())


def unresolved_panels(grid: Grid, values: np.ndarray, tol: float = 1e-13) -> np.ndarray:
    """Panels whose interpolant's last Legendre coefficients, times the width, exceed tol.

    That product bounds the error of the cumulative integrals on the panel. Coefficients at the
    rounding level of the values are noise, not missing resolution, and never flag a panel. The
    outermost panels are never flagged: they hold the (possibly singular) ends, which ``end_mass``
    polices instead.
    """
    *_, to_coeffs = _reference_panel(grid.order)
    coeffs = np.asarray(values).reshape(grid.n_panels, grid.order) @ to_coeffs.T
    tail = np.abs(coeffs[:, -2:]).sum(axis=1)
    noise = NOISE_FLOOR * np.abs(coeffs).max(axis=1)  # rounding in the values: splitting cannot help
    flags = (tail * grid.half_widths > tol) & (tail > noise)
    flags[0] = flags[-1] = False
    return flags


def refine(grid: Grid, flags: np.ndarray) -> Grid:
    """Splits each flagged panel in two (halving it in its half's own coordinate)."""
    n_left = grid.left_edges.size - 1
    left_split = np.flatnonzero(flags[:n_left])
    right_split = grid.right_edges.size - 2 - np.flatnonzero(flags[n_left:])
    le, re = grid.left_edges, grid.right_edges
    left = np.sort(np.concatenate([le, (le[left_split] + le[left_split + 1]) / 2]))
    right = np.sort(np.concatenate([re, (re[right_split] + re[right_split + 1]) / 2]))
    return grid_from_edges(left, right, grid.order)


def resample(grid: Grid, values: np.ndarray, new_grid: Grid) -> np.ndarray:
    """Values on ``new_grid`` from the panel-wise interpolants of values on ``grid``.

    Meant for a refined grid (each new panel lies inside one old panel).
    """
    return interpolate(grid, values, new_grid.u, new_grid.s)


def interpolate(grid: Grid, values: np.ndarray, u, s=None) -> np.ndarray:
    """The panel-wise interpolant of values on ``grid`` at points u in [0, 1] (s = 1 - u if given,
    for full accuracy near u = 1)."""
    *_, to_coeffs = _reference_panel(grid.order)
    u = np.atleast_1d(np.asarray(u, dtype=np.float64))
    s = 1.0 - u if s is None else np.atleast_1d(np.asarray(s, dtype=np.float64))
    v = np.asarray(values).reshape(grid.n_panels, grid.order)
    n_left = grid.left_edges.size - 1
    # Right-half panels in ascending s with nodes ascending in s, like the left half in u.
    halves = (
        (grid.left_edges, v[:n_left], u, u <= 0.5),
        (grid.right_edges, v[n_left:][::-1, ::-1], s, u > 0.5),
    )
    out = np.empty(u.size)
    for edges, panel_values, distance, where in halves:
        d = distance[where]
        k = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, edges.size - 2)
        lo, hi = edges[k], edges[k + 1]
        x = np.clip((2 * d - lo - hi) / (hi - lo), -1.0, 1.0)
        coeffs = panel_values[k] @ to_coeffs.T
        basis = legendre.legvander(x, grid.order - 1)
        out[where] = np.einsum("ij,ij->i", basis, coeffs)
    return out
