"""Reward transforms Phi(u) of a calibrated reward u in [0, 1] (algorithms.md section 3).

    identity  Phi(u) = u                 standard win rate (calibrated RLHF)
    log       Phi(u) = log u             best-of-N distillation target
    logit     Phi(u) = log(u / (1 - u))  extra baseline
    exp       Phi(u) = exp(t * u), t > 0     for best-of-N at inference
    negexp    Phi(u) = -exp(-t * u), t > 0   for worst-of-N at inference
    optimal   Phi(u) = log f*(u), rescaled onto [0, 1]: the analytic tool's exact optimum for a
              procedure (bon, won, soft_bon, sampling), tabulated (``optimal_table``) and
              linearly interpolated

All are pure jnp functions ``fn(u, t, eps)`` (t and eps may be traced), collected in ``TRANSFORMS``;
'optimal' also takes its table. ``get_transform`` validates parameters eagerly and binds them.
The names are the analytic tool's (``theory.settings.TRANSFORMS``). ``unit_range_transform`` is
the trainer's form: exp and negexp rescaled onto [0, 1], which only changes the units of beta
(``unit_range_scale``).

eps: an empirical calibration C_hat takes values k/(2m) and can be exactly 0 or 1, where log and
logit are infinite. They clip u to [eps, 1 - eps]. The natural choice is eps = 1/(2m), half the
resolution of an m-sample pool (the smallest non-zero mid-rank); ``calibrated_transform`` uses
that by default. Without a pool size, ``DEFAULT_EPS`` = 1/(2 * 100) assumes the typical m = 100.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from iapo_jax.rewards.calibration import calibrate_sorted
from iapo_jax.runtime.registry import Registry
from iapo_jax.theory.settings import PROCEDURES, TRANSFORMS as TRANSFORM_NAMES

DEFAULT_EPS = 1.0 / (2 * 100)


def identity_transform(u, t=None, eps=None):
    return jnp.asarray(u, jnp.float32)


def log_transform(u, t=None, eps=DEFAULT_EPS):
    return jnp.log(jnp.clip(jnp.asarray(u, jnp.float32), eps, 1.0 - eps))


def logit_transform(u, t=None, eps=DEFAULT_EPS):
    u = jnp.clip(jnp.asarray(u, jnp.float32), eps, 1.0 - eps)
    return jnp.log(u) - jnp.log1p(-u)


def exp_transform(u, t, eps=None):
    return jnp.exp(t * jnp.asarray(u, jnp.float32))


def negexp_transform(u, t, eps=None):
    return -jnp.exp(-t * jnp.asarray(u, jnp.float32))


class OptimalTable(NamedTuple):
    """The exact optimum's tilt on a calibrated reward, tabulated on a uniform grid of u.

    phi = (log f* - min) / (max - min) in [0, 1]; a KL-regularised policy pi_ref exp(phi / beta)
    is the optimum f* exactly at beta = 1 / log_f_range (and the solver's KL there).
    """

    u: np.ndarray  # ascending, 0 .. 1
    phi: np.ndarray
    log_f_range: float  # max - min of log f*
    procedure: str
    n: int
    lam: float | None
    kl: float  # KL(f* || uniform), the optimum's KL
    solver_beta: float  # beta of the analytic tool's units (W - beta KL)
    win_rate: float  # the optimum's inference-time win rate


# Procedures the analytic tool solves the optimum for (sampling: the identity tilt): all of them.
OPTIMAL_PROCEDURES = PROCEDURES
TABLE_POINTS = 4097  # spacing 1/4096, finer than any pool's mid-rank resolution 1/(2m) for m <= 2048


def check_optimal_procedure(procedure: str) -> None:
    if procedure not in OPTIMAL_PROCEDURES:
        raise ValueError(
            f"the optimal transform needs the analytic tool's solver, which exists for "
            f"{', '.join(OPTIMAL_PROCEDURES)}, not procedure {procedure!r}; use exp (best-of-N "
            "style) or negexp (worst-of-N style) with a given t instead"
        )


@lru_cache(maxsize=16)
def optimal_table(
    procedure: str,
    n: int,
    *,
    kl: float | None = None,
    beta: float | None = None,
    lam: float | None = None,
    points: int = TABLE_POINTS,
) -> OptimalTable:
    """Solves the exact optimum for (procedure, N[, lam]) at a target KL or a solver beta and
    tabulates its log density; raises ValueError (before solving) for a setting it cannot solve."""
    check_optimal_procedure(procedure)
    from iapo_jax.theory.analysis import analyse_density
    from iapo_jax.theory.quadrature import interpolate
    from iapo_jax.theory.settings import check_setting

    check_setting(procedure, n, "optimal", kl=kl, beta=beta, lam=lam)
    result, d = analyse_density(procedure, n, "optimal", kl=kl, beta=beta, lam=lam)
    u = np.linspace(0.0, 1.0, points)
    log_f = interpolate(d.grid, d.log_f, u)
    lo, hi = float(log_f.min()), float(log_f.max())
    spread = max(hi - lo, 1e-300)
    return OptimalTable(u, (log_f - lo) / spread, hi - lo, procedure, int(n), lam, result.kl,
                        float(np.exp(result.log_beta)), result.win_rate)


def optimal_transform(u, table: OptimalTable):
    """Phi(u) by linear interpolation in the table (pure; the table is a constant under jit)."""
    return jnp.interp(jnp.asarray(u, jnp.float32), jnp.asarray(table.u, jnp.float32),
                      jnp.asarray(table.phi, jnp.float32))


class TransformSpec(NamedTuple):
    fn: Callable
    needs_t: bool  # t > 0 is required (exp, negexp); others take no t
    clips: bool  # uses eps
    needs_table: bool = False  # 'optimal': an OptimalTable


TRANSFORMS: Registry[TransformSpec] = Registry("transform")
TRANSFORMS.register("identity", TransformSpec(identity_transform, needs_t=False, clips=False))
TRANSFORMS.register("log", TransformSpec(log_transform, needs_t=False, clips=True))
TRANSFORMS.register("logit", TransformSpec(logit_transform, needs_t=False, clips=True))
TRANSFORMS.register("exp", TransformSpec(exp_transform, needs_t=True, clips=False))
TRANSFORMS.register("negexp", TransformSpec(negexp_transform, needs_t=True, clips=False))
TRANSFORMS.register("optimal", TransformSpec(optimal_transform, needs_t=False, clips=False, needs_table=True))


assert tuple(TRANSFORMS) == TRANSFORM_NAMES, "one transform per name the analytic tool knows"


def available_transforms() -> list[str]:
    return TRANSFORMS.names()


def _spec(name: str) -> TransformSpec:
    return TRANSFORMS.get(name)


def _check_params(name: str, spec: TransformSpec, t, eps, table=None) -> None:
    if spec.needs_table and not isinstance(table, OptimalTable):
        raise ValueError(
            f"transform {name!r} needs its table: optimal_table(procedure, n, kl=...) solves it"
        )
    if not spec.needs_table and table is not None:
        raise ValueError(f"transform {name!r} takes no table; only 'optimal' does")
    if spec.needs_t:
        if t is None:
            raise ValueError(f"transform {name!r} needs a parameter t > 0 (e.g. t=5.0); got none")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"transform {name!r} needs a finite t > 0, got t={t!r}; larger t tilts harder "
                "towards the top (exp) or away from the bottom (negexp) of the calibrated reward"
            )
    elif t is not None:
        raise ValueError(f"transform {name!r} takes no parameter t, got t={t!r}; leave t unset")
    if eps is not None and not (isinstance(eps, (int, float)) and 0.0 < eps < 0.5):
        raise ValueError(f"eps must be a number in (0, 0.5), got {eps!r}; 1/(2m) suits an m-sample pool")


def get_transform(
    name: str, t: float | None = None, eps: float | None = None, table: OptimalTable | None = None
) -> Callable:
    """Returns Phi as a pure function of u, with t (and eps for log/logit, the table for optimal)
    checked and bound."""
    spec = _spec(name)
    _check_params(name, spec, t, eps, table)
    eps = DEFAULT_EPS if eps is None else float(eps)
    t = None if t is None else float(t)

    def phi(u):
        return optimal_transform(u, table) if spec.needs_table else spec.fn(u, t, eps)

    phi.__name__ = f"{name}_transform"
    return phi


def calibrated_transform(
    name: str, t: float | None = None, eps: float | None = None, table: OptimalTable | None = None
) -> Callable:
    """Returns ``fn(scores [P, n], pool_sorted [P, m]) -> Phi(C_hat)`` [P, n], pure and jittable.

    pool_sorted rows must be ascending (``ReferencePool.scores`` is): the lookup is a binary search
    and does not sort, because sorting under XLA:CPU costs far more than the search. With eps
    unset, log/logit clip at 1/(2m) for the pool's own m (a static shape under jit).
    """
    spec = _spec(name)
    _check_params(name, spec, t, eps, table)
    t = None if t is None else float(t)

    def fn(scores, pool_sorted):
        u = calibrate_sorted(scores, pool_sorted)
        if spec.needs_table:
            return optimal_transform(u, table)
        clip = eps if eps is not None else 1.0 / (2 * jnp.shape(pool_sorted)[-1])
        return spec.fn(u, t, clip)

    fn.__name__ = f"calibrated_{name}_transform"
    return fn


def unit_range_scale(name: str, t: float | None) -> float:
    """a > 0 with unit_range_transform(name, t) = a * Phi + b: e^t - 1 shrinks exp(tu) onto [0, 1]
    by 1 / (e^t - 1), and 1 - e^{-t} shrinks -exp(-tu) by 1 / (1 - e^{-t}); 1 for the others.
    The tilted optimum pi_ref * exp((a * Phi + b) / beta) is Phi's at beta / a, so a beta in Phi's
    units (the analytic tool's) is that beta divided by a in the trainer's."""
    if name == "exp":
        return math.expm1(t)
    if name == "negexp":
        return -math.expm1(-t)
    return 1.0


def unit_range_transform(name: str, t: float | None, eps: float | None = None, table=None) -> Callable:
    """Phi for the trainer: exp / negexp rescaled affinely onto [0, 1].

    a * Phi + b with a > 0 has the same tilted optimum as Phi at beta * a, so this changes only the
    units of beta: rewards stay O(1) for any t (exp(t u) itself overflows float32 beyond t = 88 and
    needs beta ~ e^t), and one beta / KL controller works across transforms.
      exp:     (e^{t(u-1)} - e^{-t}) / (1 - e^{-t})  = (e^{tu} - 1) / (e^t - 1)
      negexp:  (1 - e^{-tu}) / (1 - e^{-t})
    Other transforms are returned unchanged (optimal is on [0, 1] already); log / logit clip u to
    [eps, 1 - eps], with eps = 1/(2m) for an m-sample pool (the smallest non-zero mid-rank), as
    the CTRL trainer passes it.
    """
    if name == "exp":
        return lambda u: (jnp.exp(t * (jnp.asarray(u, jnp.float32) - 1.0)) - jnp.exp(-t)) / -jnp.expm1(-t)
    if name == "negexp":
        return lambda u: -jnp.expm1(-t * jnp.asarray(u, jnp.float32)) / -jnp.expm1(-t)
    return get_transform(name, t, eps if TRANSFORMS.get(name).clips else None, table=table)


def transform_top(phi: Callable, eps: float | None = None) -> float:
    """max Phi(u) over u in [0, 1] (on a fine grid, as 'optimal' need not be monotone): the level
    the CTRL reward floor is measured from."""
    lo = 0.0 if eps is None else eps
    u = jnp.linspace(lo, 1.0 - lo, 4097, dtype=jnp.float32)
    return float(jnp.max(phi(u)))
