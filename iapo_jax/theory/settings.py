"""The procedures and transforms the analytic tool knows, and which combinations it accepts.

Accepted transforms per procedure (anything else is rejected before compute starts):

    sampling  identity, log, logit, optimal      ('optimal' is the identity tilt, exactly)
    bon       identity, log, logit, exp, optimal
    won       identity, log, logit, negexp, optimal
    soft_bon  identity, log, logit, exp, optimal      (needs lam, the selection temperature)

Why: exp(t u) sharpens the top of the reward, which is what best-of-N serves; -exp(-t u) lifts the
bottom, which is what worst-of-N serves. Used the other way round they only move the policy away
from what the procedure rewards, and the best t runs off to the degenerate limit t -> 0 (the
identity tilt); for plain sampling the identity tilt is already optimal, so exp/negexp add nothing.
The logit tilt u^(1/beta) (1-u)^(-1/beta) is normalisable only for beta > 1. Without t, exp and
negexp use the best t at the target KL, so with beta instead of a KL they need an explicit t.
"""

from __future__ import annotations

import math
import numbers

from iapo_jax.theory.soft_bon import check_lam

PROCEDURES = ("sampling", "bon", "won", "soft_bon")
TRANSFORMS = ("identity", "log", "logit", "exp", "negexp", "optimal")
EXPONENTIAL = ("exp", "negexp")
FITS = {
    "sampling": ("identity", "log", "logit", "optimal"),
    "bon": ("identity", "log", "logit", "exp", "optimal"),
    "won": ("identity", "log", "logit", "negexp", "optimal"),
    "soft_bon": ("identity", "log", "logit", "exp", "optimal"),  # a softened best-of-N
}
T_MAX = 1e4  # beyond this even N = 32 at KL 2 gains nothing; tilts are computed in log beta


def _positive(name: str, value, hint: str) -> None:
    if value is None:
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; {hint}")


def check_setting(
    procedure: str,
    n: int,
    transform: str,
    *,
    kl: float | None = None,
    beta: float | None = None,
    t: float | None = None,
    lam: float | None = None,
) -> None:
    """Raises ValueError naming the problem and the fix; returns None when the setting is valid."""
    if procedure not in PROCEDURES:
        raise ValueError(f"unknown procedure {procedure!r}; use one of {', '.join(PROCEDURES)}")
    if procedure == "soft_bon":
        if lam is None:
            raise ValueError("soft_bon needs its selection temperature lam > 0 (e.g. lam=0.1)")
        check_lam(lam)
    elif lam is not None:
        raise ValueError(f"lam is soft_bon's selection temperature; leave it unset for {procedure}")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; use one of {', '.join(TRANSFORMS)}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"N must be an integer >= 1, got {n!r}; N is the number of responses drawn")
    if procedure == "sampling" and n != 1:
        raise ValueError(
            f"sampling serves a single response, so N must be 1 (got {n}); "
            "use procedure 'bon' or 'won' for N > 1"
        )
    if transform not in FITS[procedure]:
        raise ValueError(
            f"transform {transform!r} does not fit procedure {procedure!r}; use one of "
            f"{', '.join(FITS[procedure])} (exp is for bon, negexp for won; for sampling the "
            "identity tilt is already optimal)"
        )
    _positive("beta", beta, "beta is the KL weight of the tilted policy")
    _positive("kl", kl, "the target KL(pi || pi_ref) in nats must be positive")
    if (kl is None) == (beta is None):
        raise ValueError("give exactly one of kl (a target KL in nats) or beta (the KL weight)")
    if transform == "logit" and beta is not None and beta <= 1.0:
        raise ValueError(
            f"the logit tilt (u/(1-u))^(1/beta) is not normalisable for beta <= 1 (got beta={beta}); "
            "use beta > 1 or give a target kl instead"
        )
    if t is not None:
        if transform not in EXPONENTIAL:
            raise ValueError(
                f"t applies only to the exp and negexp transforms, not {transform!r}; leave t unset"
            )
        _positive("t", t, "t is the exponent of exp(t u) / -exp(-t u)")
        if t > T_MAX:
            raise ValueError(f"t={t} is beyond the supported range; use t <= {T_MAX:g}")
    elif transform in EXPONENTIAL and kl is None:
        raise ValueError(
            f"with beta, the {transform} transform needs an explicit t (the best t is defined at a "
            "target KL); give t, or give kl instead of beta"
        )
