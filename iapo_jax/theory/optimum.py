"""The exact optimum over all policies at a KL weight beta: the fixed point f ∝ exp(R_f / beta).

R_f(u) is the derivative of the inference-time win rate with respect to f(u) (algorithms.md §4):

    BoN_N:  R(u) = -N^2 int_u^1 F(v)^(N-1) v^(N-1) dv        (concave problem: unique fixed point)
    WoN_N:  R(u) = -N^2 int_u^1 (1-F(v))^(N-1) (1-v)^(N-1) dv (not concave: several may exist)
    soft-BoN_N,lam: see soft_bon.stationarity_reward (BoN's R in the limit lam -> 0)

For N = 1 both give R(u) = u - 1, the identity tilt, in one step.

The map x = log f -> normalise(R_f / beta) is not a contraction for small beta: BoN's linearisation
has real eigenvalues in [-L, 0], L growing as beta shrinks (about 16 for N = 4 and 47 for N = 32 at
beta = e^-8). So the iteration is damped. Far from the fixed point a damped step in log f is a
mirror-ascent step on W - beta KL, and its size comes from backtracking on that objective. Near it
the objective is too flat to guide, so the damping comes from L (a few power-iteration steps) and
Anderson mixing speeds it up. WoN's stable fixed points have eigenvalues in [0, 1): no damping.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import iapo_jax.theory.soft_bon as soft_bon
from iapo_jax.theory.densities import Density, density_from_log_tilt, uniform_density
from iapo_jax.theory.quadrature import Grid, cumulative, refine, resample, unresolved_panels
from iapo_jax.theory.tilts import log_tilt
from iapo_jax.theory.win_rates import inference_win_rate, kl_divergence

TOL = 1e-10  # sup-norm change of log f at convergence, over the nodes where f carries any mass
NEGLIGIBLE_LOG_F = -60.0  # below this f holds no mass worth converging
MAX_ITER = 5000
MAX_REFINEMENTS = 60
POWER_STEPS = 12
FD_STEP = 1e-6  # finite-difference step in log f for Jacobian-vector products
MIX_BELOW = 0.1  # Anderson mixing only once the iterate is near the fixed point
WON_SEEDS = (("negexp", -2.0, 30.0), ("identity", -2.0, None), ("log", 0.0, None))  # (Phi, log beta, t)


def stationarity_reward(d: Density, procedure: str, n: int, lam: float | None = None) -> np.ndarray:
    """R_f at the grid nodes (shifted so that R(1) = 0; soft-BoN's is not shifted)."""
    g = d.grid
    if procedure == "soft_bon":
        return soft_bon.stationarity_reward(d, n, lam)
    if procedure not in ("sampling", "bon", "won"):
        raise ValueError(f"unknown procedure {procedure!r}; use sampling, bon, won or soft_bon")
    if procedure == "sampling" or n == 1:
        integrand = np.ones_like(g.u)
    elif procedure == "bon":
        integrand = np.exp((n - 1) * (d.log_cdf + g.log_u))
    else:
        integrand = np.exp((n - 1) * (d.log_sf + g.log_s))
    _, from_right = cumulative(g, integrand)
    return -(n * n) * from_right


def _residual(x: np.ndarray, fx: np.ndarray) -> float:
    return float(np.max(np.abs(fx - x)[fx > NEGLIGIBLE_LOG_F]))


def _normalise(g: Grid, x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.dot(g.weights, np.exp(x - m)))


def _dominant_eigenvalue(step, x: np.ndarray, fx: np.ndarray, mask: np.ndarray) -> float:
    """Power iteration on the Jacobian of the map (finite differences), over nodes that hold mass."""
    v = np.where(mask, np.cos(np.arange(x.size) * 0.7), 0.0)
    lam = 0.0
    for _ in range(POWER_STEPS):
        v = v / np.max(np.abs(v))
        jv = np.where(mask, (step(x + FD_STEP * v) - fx) / FD_STEP, 0.0)
        if not np.any(jv):  # the map does not depend on x (N = 1)
            return 0.0
        lam = np.sign(np.dot(v, jv)) * np.linalg.norm(jv) / np.linalg.norm(v)
        v = jv
    return float(lam)


def _anderson_step(xs: list, gs: list, a: float) -> np.ndarray:
    """Anderson (type II) mixing of the last iterates, with damping a."""
    x, g = xs[-1], gs[-1]
    if len(xs) < 2:
        return x + a * g
    dx = np.diff(np.array(xs), axis=0).T
    dg = np.diff(np.array(gs), axis=0).T
    gram = dg.T @ dg
    gram += 1e-14 * np.trace(gram) * np.eye(gram.shape[0])  # keeps the small solve regular
    gamma = np.linalg.solve(gram, dg.T @ g)
    return x + a * g - (dx + a * dg) @ gamma


def _converge(
    grid: Grid,
    x: np.ndarray,
    procedure: str,
    n: int,
    log_beta: float,
    damping: float | None,
    memory: int,
    lam: float | None = None,
) -> tuple[np.ndarray, float]:
    """Iterates x = log f to the fixed point on a fixed grid; returns (log f, damping used).

    Far from the fixed point: mirror ascent x <- x + a (T(x) - x) on the regularised objective,
    halving a until the objective does not drop (it is the exact mirror step for that objective).
    Near it, where the objective is too flat to guide: the damping that makes the linearised map a
    contraction (from its dominant eigenvalue, BoN's is -L < 0), accelerated by Anderson mixing.
    """
    inv_beta = np.exp(-log_beta)

    def step(x: np.ndarray) -> np.ndarray:
        d = density_from_log_tilt(grid, _normalise(grid, x))
        return _normalise(grid, stationarity_reward(d, procedure, n, lam) * inv_beta)

    def objective(x: np.ndarray) -> float:
        d = density_from_log_tilt(grid, _normalise(grid, x))
        return regularised_objective(d, procedure, n, log_beta, lam)

    x = _normalise(grid, x)
    fx = step(x)
    res = _residual(x, fx)
    if res >= MIX_BELOW:  # phase 1: monotone ascent
        obj, a = objective(x), 0.5
        for _ in range(MAX_ITER):
            for _ in range(60):
                trial = _normalise(grid, x + a * (fx - x))
                t_obj = objective(trial)
                if t_obj >= obj - 1e-13 * (1.0 + abs(obj)):
                    break
                a *= 0.5
            x, obj = trial, t_obj
            fx = step(x)
            res = _residual(x, fx)
            a = min(1.0, 2.0 * a)
            if res < MIX_BELOW:
                break
    if damping is None:
        eig = _dominant_eigenvalue(step, x, fx, fx > NEGLIGIBLE_LOG_F)
        damping = 1.0 if eig > -0.5 else 1.6 / (2.0 - eig)  # spectrum in [eig, 0]: |1 - a(1 - eig)| < 1
    a = damping
    xs, gs, best, worse = [], [], res, 0
    for _ in range(MAX_ITER):  # phase 2: damped iteration with Anderson mixing
        if res < TOL:
            return fx, damping
        xs, gs = (xs + [x])[-(memory + 1):], (gs + [fx - x])[-(memory + 1):]
        x = _normalise(grid, _anderson_step(xs, gs, a))
        fx = step(x)
        res = _residual(x, fx)
        if res < best:
            best, worse = res, 0
        else:
            worse += 1
            if worse > 2 * memory:  # mixing stalled: restart it with more damping
                xs, gs, worse, a = [], [], 0, 0.5 * a
                damping = a
    raise ValueError(
        f"the optimum fixed point for {procedure} N={n} did not converge at beta={np.exp(log_beta):.4g} "
        f"(residual {res:.2g}); try a larger beta or a smaller target KL"
    )


class FixedPoint(NamedTuple):
    density: Density
    damping: float  # a damping that worked: a good first guess at a nearby beta


def solve_fixed_point(
    grid: Grid,
    procedure: str,
    n: int,
    log_beta: float,
    init: Density | None = None,
    *,
    damping: float | None = None,
    memory: int = 8,
    lam: float | None = None,
) -> FixedPoint:
    """Solves f ∝ exp(R_f / beta) from ``init`` (uniform if None), on init's grid when given.

    Panels that do not resolve the solution (such as the sharp cut-off of the WoN optimum at small
    beta) are split and the iteration resumes on the finer grid. Without ``damping``, it is
    estimated from the map's dominant eigenvalue.
    """
    if init is not None:
        grid = init.grid
    x = (init if init is not None else uniform_density(grid)).log_f
    for _ in range(MAX_REFINEMENTS):
        x, damping = _converge(grid, x, procedure, n, log_beta, damping, memory, lam)
        d = density_from_log_tilt(grid, x)
        flags = unresolved_panels(grid, d.f)
        if not flags.any():
            return FixedPoint(d, damping)
        finer = refine(grid, flags)
        x, grid = resample(grid, x, finer), finer
    raise ValueError(
        f"the optimum for {procedure} N={n} at beta={np.exp(log_beta):.4g} is too sharp to resolve; "
        "try a larger beta or a smaller target KL"
    )


def fixed_point_density(
    grid: Grid,
    procedure: str,
    n: int,
    log_beta: float,
    init: Density | None = None,
    lam: float | None = None,
) -> Density:
    """The fixed point reached from ``init`` (see ``solve_fixed_point``)."""
    return solve_fixed_point(grid, procedure, n, log_beta, init, lam=lam).density


def starting_points(grid: Grid, procedure: str) -> list[Density]:
    """Uniform first, then a few tilts; WoN's fixed points need not be unique, so it tries them all."""
    starts = [uniform_density(grid)]
    if procedure == "won":
        for transform, log_beta, t in WON_SEEDS:
            starts.append(density_from_log_tilt(grid, log_tilt(grid, transform, log_beta, t)))
    return starts


def regularised_objective(
    d: Density, procedure: str, n: int, log_beta: float, lam: float | None = None
) -> float:
    """W^T(pi > pi_ref) - beta * KL: what a fixed point at this beta is a stationary point of."""
    return inference_win_rate(d, procedure, n, lam) - np.exp(log_beta) * kl_divergence(d)


def best_stationary_density(
    grid: Grid, procedure: str, n: int, log_beta: float, lam: float | None = None
) -> Density:
    """The optimum for BoN (unique); for WoN the best of the fixed points reached from several starts."""
    starts = starting_points(grid, procedure)
    found = [fixed_point_density(grid, procedure, n, log_beta, start, lam) for start in starts]
    return max(found, key=lambda d: regularised_objective(d, procedure, n, log_beta, lam))
