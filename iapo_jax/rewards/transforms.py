"""Reward transforms Phi(u) of a calibrated reward u in [0, 1] (algorithms.md section 3).

    identity  Phi(u) = u                 standard win rate (calibrated RLHF)
    log       Phi(u) = log u             best-of-N distillation target
    logit     Phi(u) = log(u / (1 - u))  extra baseline
    exp       Phi(u) = exp(t * u), t > 0     for best-of-N at inference
    negexp    Phi(u) = -exp(-t * u), t > 0   for worst-of-N at inference

All are pure jnp functions ``fn(u, t, eps)`` (t and eps may be traced), collected in ``TRANSFORMS``.
``get_transform`` validates parameters eagerly and binds them.

eps: an empirical calibration C_hat takes values k/(2m) and can be exactly 0 or 1, where log and
logit are infinite. They clip u to [eps, 1 - eps]. The natural choice is eps = 1/(2m), half the
resolution of an m-sample pool (the smallest non-zero mid-rank); ``calibrated_transform`` uses
that by default. Without a pool size, ``DEFAULT_EPS`` = 1/(2 * 100) assumes the typical m = 100.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax.numpy as jnp

from iapo_jax.rewards.calibration import calibrate_sorted

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


class TransformSpec(NamedTuple):
    fn: Callable
    needs_t: bool  # t > 0 is required (exp, negexp); others take no t
    clips: bool  # uses eps


TRANSFORMS: dict[str, TransformSpec] = {
    "identity": TransformSpec(identity_transform, needs_t=False, clips=False),
    "log": TransformSpec(log_transform, needs_t=False, clips=True),
    "logit": TransformSpec(logit_transform, needs_t=False, clips=True),
    "exp": TransformSpec(exp_transform, needs_t=True, clips=False),
    "negexp": TransformSpec(negexp_transform, needs_t=True, clips=False),
}


def available_transforms() -> list[str]:
    return sorted(TRANSFORMS)


def _spec(name: str) -> TransformSpec:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(
            f"unknown transform {name!r}; available transforms: {', '.join(available_transforms())}"
        ) from None


def _check_params(name: str, spec: TransformSpec, t, eps) -> None:
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


def get_transform(name: str, t: float | None = None, eps: float | None = None) -> Callable:
    """Returns Phi as a pure function of u, with t (and eps for log/logit) checked and bound."""
    spec = _spec(name)
    _check_params(name, spec, t, eps)
    eps = DEFAULT_EPS if eps is None else float(eps)
    t = None if t is None else float(t)

    def phi(u):
        return spec.fn(u, t, eps)

    phi.__name__ = f"{name}_transform"
    return phi


def calibrated_transform(name: str, t: float | None = None, eps: float | None = None) -> Callable:
    """Returns ``fn(scores [P, n], pool_sorted [P, m]) -> Phi(C_hat)`` [P, n], pure and jittable.

    pool_sorted rows must be ascending (``ReferencePool.scores`` is): the lookup is a binary search
    and does not sort, because sorting under XLA:CPU costs far more than the search. With eps
    unset, log/logit clip at 1/(2m) for the pool's own m (a static shape under jit).
    """
    spec = _spec(name)
    _check_params(name, spec, t, eps)
    t = None if t is None else float(t)

    def fn(scores, pool_sorted):
        u = calibrate_sorted(scores, pool_sorted)
        clip = eps if eps is not None else 1.0 / (2 * jnp.shape(pool_sorted)[-1])
        return spec.fn(u, t, clip)

    fn.__name__ = f"calibrated_{name}_transform"
    return fn
