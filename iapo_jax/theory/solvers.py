"""Root finding for the KL weight beta at a target KL, and the best t of the exponential transforms.

KL of f ∝ exp(Phi/beta) grows monotonically with 1/beta (d KL / d(1/beta) = Var(Phi)/beta >= 0), so
beta at a target KL is a one-dimensional bracketed root in x = log beta. The logit tilt exists only
for beta > 1, so there x = log(beta - 1). The best t maximises the win rate at the target KL over
log t: a coarse scan (the curve is flat near its top, so a scan is safer than a pure local search),
then a bounded scalar search between the scan's neighbours of the best point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import optimize

from iapo_jax.theory.densities import Density, resolved_density
from iapo_jax.theory.optimum import (
    fixed_point_density,
    regularised_objective,
    solve_fixed_point,
    starting_points,
)
from iapo_jax.theory.quadrature import Grid
from iapo_jax.theory.settings import T_MAX
from iapo_jax.theory.tilts import log_tilt
from iapo_jax.theory.win_rates import inference_win_rate, kl_divergence

T_MIN = 0.05  # below this exp(t u) is the identity tilt to within t^2
SCAN_POINTS = 25
REUSE_PANELS = 2  # keep a refined grid for the next solve unless it grew past this factor
BRACKET_STEP = 0.5
BRACKET_STEPS = 12  # doubling steps reach 2000 in log beta: beyond any resolvable density


def log_beta_of(transform: str, x: float) -> float:
    """The root-finding coordinate x mapped to log beta (logit needs beta > 1)."""
    return float(np.logaddexp(0.0, x)) if transform == "logit" else float(x)


def _initial_x(transform: str, t: float | None) -> float:
    """A log beta of the order of Phi's range, where KL is moderate."""
    if transform == "exp":
        return float(t + np.log(-np.expm1(-t)))
    if transform == "negexp":
        return float(np.log(-np.expm1(-t)))
    return 0.0


def solve_for_kl(
    density_at: Callable[[float], Density], target_kl: float, x0: float, label: str
) -> tuple[float, Density]:
    """Finds x with KL(density_at(x)) = target_kl, KL decreasing in x; returns (x, density).

    A density the grid cannot resolve (or a fixed point that does not converge) only happens at
    small beta, so it counts as "KL too large" while bracketing.
    """
    cache: dict[float, Density] = {}
    failure: list[str] = []

    def excess(x: float) -> float:
        try:
            cache[x] = density_at(x)
        except ValueError as err:
            failure.append(str(err))
            return np.inf
        return kl_divergence(cache[x]) - target_kl

    def out_of_reach() -> ValueError:
        why = f": {failure[-1]}" if failure else ""
        return ValueError(f"target KL {target_kl:g} is out of reach for {label}{why}")

    lo = hi = x0
    e_lo = e_hi = excess(x0)
    step = BRACKET_STEP
    for _ in range(BRACKET_STEPS):
        if e_lo > 0 > e_hi or e_lo == 0 or e_hi == 0:
            break
        if e_hi > 0:  # KL too large: larger beta
            lo, e_lo = hi, e_hi
            hi += step
            e_hi = excess(hi)
        else:
            hi, e_hi = lo, e_lo
            lo -= step
            e_lo = excess(lo)
        step *= 2.0  # beta can sit many orders of magnitude from the guess (exp tilts with large t)
    else:
        raise out_of_reach()
    for _ in range(60):  # an unresolvable lower end: bisect towards the root until it resolves
        if np.isfinite(e_lo):
            break
        mid = 0.5 * (lo + hi)
        e_mid = excess(mid)
        if e_mid < 0:
            hi, e_hi = mid, e_mid
        else:
            lo, e_lo = mid, e_mid
    if not np.isfinite(e_lo):
        raise out_of_reach()
    for x, e in ((lo, e_lo), (hi, e_hi)):
        if e == 0:
            return x, cache[x]
    x = optimize.brentq(excess, lo, hi, xtol=1e-13, rtol=1e-15, maxiter=200)
    if x not in cache:
        excess(x)
    if x not in cache:
        raise out_of_reach()
    return x, cache[x]


def tilted_at_kl(
    grid: Grid, transform: str, target_kl: float, t: float | None = None, x0: float | None = None
) -> tuple[float, Density]:
    """(log beta, density) of a closed-form tilt at the target KL; x0 is a first guess of x."""
    current = [grid]  # each solve starts on the last refined grid: the features move little

    def density_at(x: float) -> Density:
        log_beta = log_beta_of(transform, x)
        d = resolved_density(current[0], lambda g: log_tilt(g, transform, log_beta, t))
        if d.grid.n_panels <= REUSE_PANELS * grid.n_panels:
            current[0] = d.grid
        return d

    x, d = solve_for_kl(
        density_at,
        target_kl,
        _initial_x(transform, t) if x0 is None else x0,
        f"the {transform} transform" + (f" at t={t:g}" if t is not None else ""),
    )
    return log_beta_of(transform, x), d


def optimal_at_kl(
    grid: Grid, procedure: str, n: int, target_kl: float, lam: float | None = None
) -> tuple[float, Density]:
    """(log beta, density) of the best stationary point at the target KL.

    Continuation from the uniform density at beta = 1: each solve starts from the previous solution.
    WoN's fixed points need not be unique, so the other starting points are solved at beta = 1 too;
    one that reaches a different stationary point there is followed to the target KL as its own
    branch, and the branch with the highest win rate wins. (Branches born at smaller beta would be
    missed; none has been seen for N <= 32.)
    """
    label = f"the optimum for {procedure} N={n}"

    def follow(start: Density) -> tuple[float, Density]:
        state = [start, None]

        def density_at(x: float) -> Density:
            d, state[1] = solve_fixed_point(
                grid, procedure, n, x, state[0], damping=state[1], lam=lam
            )
            state[0] = d
            return d

        return solve_for_kl(density_at, target_kl, 0.0, label)

    def objective_at_beta_one(d: Density) -> float:
        return regularised_objective(d, procedure, n, 0.0, lam)

    first, *others = starting_points(grid, procedure)
    branches = [fixed_point_density(grid, procedure, n, 0.0, first, lam)]
    for start in others:
        d = fixed_point_density(grid, procedure, n, 0.0, start, lam)
        if all(abs(objective_at_beta_one(d) - objective_at_beta_one(b)) > 1e-9 for b in branches):
            branches.append(d)
    results = [follow(b) for b in branches]
    return max(results, key=lambda r: inference_win_rate(r[1], procedure, n, lam))


def best_t(
    grid: Grid,
    procedure: str,
    n: int,
    transform: str,
    target_kl: float,
    lam: float | None = None,
) -> tuple[float, float, Density]:
    """(t, log beta, density) maximising the procedure's win rate at the target KL.

    Warns when the best t sits at an end of [T_MIN, T_MAX] (the true optimum may lie beyond).
    """
    solved: dict[float, tuple[float, Density]] = {}
    offsets: dict[float, float] = {}  # log beta minus log of Phi's range: slow in t, a warm start

    def loss(log_t: float) -> float:
        t = float(np.exp(log_t))
        scale = _initial_x(transform, t)
        near = min(offsets, key=lambda k: abs(k - log_t), default=None)
        solved[log_t] = tilted_at_kl(grid, transform, target_kl, t, scale + offsets.get(near, 0.0))
        offsets[log_t] = solved[log_t][0] - scale
        return -inference_win_rate(solved[log_t][1], procedure, n, lam)

    scan = np.linspace(np.log(T_MIN), np.log(T_MAX), SCAN_POINTS)
    values = []
    for log_t in scan:
        try:
            values.append(loss(log_t))
        except ValueError:  # very large t can be out of the grid's reach at this KL: not the best
            values.append(np.inf)
    i = int(np.argmin(values))
    if not np.isfinite(values[i]):
        raise ValueError(
            f"no t in [{T_MIN}, {T_MAX}] reaches KL {target_kl:g} with {transform}; try a smaller KL"
        )
    lo, hi = scan[max(i - 1, 0)], scan[min(i + 1, len(scan) - 1)]
    res = optimize.minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    log_t = float(res.x) if res.fun <= values[i] else float(scan[i])
    if log_t not in solved:
        loss(log_t)
    if i in (0, len(scan) - 1):
        warnings.warn(
            f"the best t for {transform} at N={n}, KL={target_kl:g} is at the end of the search "
            f"range [{T_MIN}, {T_MAX:g}]; the optimum may lie beyond it",
            stacklevel=2,
        )
    log_beta, d = solved[log_t]
    return float(np.exp(log_t)), log_beta, d
