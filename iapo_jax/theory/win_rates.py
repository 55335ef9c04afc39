"""KL and win rates of a tilted density against pi_ref (algorithms.md section 4).

    KL                = int f log f
    standard win rate = int u f
    BoN_N win rate    = 1 - N int F^N u^(N-1)           = int N u^(N-1) (1 - F^N)
    WoN_N win rate    = 1 - N int (1-u)^(N-1) [1 - (1-F)^N] = int N (1-u)^(N-1) (1-F)^N
    soft-BoN_N,lam    = int g_pi G_ref    (served density g and its CDF G: see soft_bon.py)

Each is evaluated in the second form: a positive integrand, with 1 - F^N from log F via expm1, so
nothing cancels when F is close to 1 or N is large. Ties have probability zero (continuous u).
"""

from __future__ import annotations

import numpy as np

import iapo_jax.theory.soft_bon as soft_bon
from iapo_jax.theory.densities import Density
from iapo_jax.theory.quadrature import integrate, interpolate

UNKNOWN = "unknown procedure {!r}; use sampling, bon, won or soft_bon"


def kl_divergence(d: Density) -> float:
    """KL(pi || pi_ref) in nats."""
    return max(integrate(d.grid, d.f * d.log_f), 0.0)


def standard_win_rate(d: Density) -> float:
    """P(u_pi > u_ref) for one sample of each."""
    return integrate(d.grid, d.grid.u * d.f)


def served_cdf(
    d: Density, procedure: str, n: int, lam: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(CDF, 1 - CDF) of the calibrated reward of the response that the procedure serves."""
    if procedure == "soft_bon":
        return soft_bon.served_cdf(d, n, lam)
    if procedure == "sampling" or n == 1:
        return d.cdf, d.sf
    if procedure == "bon":
        one_minus = -np.expm1(n * d.log_cdf)
        return np.exp(n * d.log_cdf), one_minus
    if procedure == "won":
        return -np.expm1(n * d.log_sf), np.exp(n * d.log_sf)
    raise ValueError(UNKNOWN.format(procedure))


def bon_win_rate(d: Density, n: int) -> float:
    """W(BoN_N(pi) > BoN_N(pi_ref))."""
    g = d.grid
    ref_density = n * np.exp((n - 1) * g.log_u)
    return integrate(g, ref_density * -np.expm1(n * d.log_cdf))


def won_win_rate(d: Density, n: int) -> float:
    """W(WoN_N(pi) > WoN_N(pi_ref))."""
    g = d.grid
    ref_density = n * np.exp((n - 1) * g.log_s)
    return integrate(g, ref_density * np.exp(n * d.log_sf))


def inference_win_rate(d: Density, procedure: str, n: int, lam: float | None = None) -> float:
    """W^T(pi > pi_ref) for T = sampling, BoN_N, WoN_N or soft-BoN_N at selection temperature lam."""
    if procedure == "soft_bon":
        return soft_bon.win_rate(d, n, lam)
    if procedure == "sampling":
        return standard_win_rate(d)
    if procedure == "bon":
        return bon_win_rate(d, n)
    if procedure == "won":
        return won_win_rate(d, n)
    raise ValueError(UNKNOWN.format(procedure))


def served_law(
    d: Density, procedure: str, n: int, lam: float | None = None, points=(0.1, 0.25, 0.5, 0.75, 0.9)
) -> dict:
    """The served calibrated reward of T(pi) and T(pi_ref): means and CDFs at ``points``."""
    from iapo_jax.theory.densities import uniform_density

    out = {"u": [float(p) for p in points]}
    for key, dens in (("policy", d), ("reference", uniform_density(d.grid))):
        cdf, sf = served_cdf(dens, procedure, n, lam)
        out[f"{key}_mean"] = 1.0 - integrate(d.grid, cdf)  # E[u] = int (1 - CDF)
        out[f"{key}_cdf"] = [float(v) for v in interpolate(d.grid, cdf, points)]
    return out
