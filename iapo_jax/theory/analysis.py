"""One question to the analytic tool: a procedure, N, a transform, and a target KL or a beta.

    result = analyse("bon", 4, "exp", kl=1.0)        # best t, beta at KL 1, BoN_4 win rate
    result = analyse("won", 4, "optimal", beta=0.05)
    result = analyse("soft_bon", 4, "exp", kl=1.0, lam=0.1)   # soft best-of-4, temperature 0.1

The answer holds for any prompt, model and reward once the reward is calibrated (algorithms.md §4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from iapo_jax.theory.densities import Density, resolved_density
from iapo_jax.theory.optimum import best_stationary_density
from iapo_jax.theory.quadrature import Grid, make_grid
from iapo_jax.theory.settings import EXPONENTIAL, check_setting
from iapo_jax.theory.soft_bon import soft_bon_grid
from iapo_jax.theory.solvers import best_t, optimal_at_kl, tilted_at_kl
from iapo_jax.theory.tilts import log_tilt
from iapo_jax.theory.win_rates import inference_win_rate, kl_divergence, standard_win_rate

DEEP = 1e-300  # the logit tilt is singular at u = 1: its grid reaches as close as doubles allow


@dataclass(frozen=True)
class TheoryResult:
    """KL and win rates of the tilted policy against pi_ref (ties impossible: u is continuous).

    beta is in the units of Phi as algorithms.md defines it (exp(t u) for 'exp'); for very large t
    it exceeds double range and is None, while log_beta is always given.
    """

    procedure: str
    n: int
    transform: str
    kl: float
    beta: float | None
    log_beta: float
    t: float | None
    win_rate: float  # W^T(pi > pi_ref) for the procedure T
    standard_win_rate: float  # W(pi > pi_ref) for single samples
    lam: float | None = None  # soft-BoN's selection temperature (None for other procedures)

    def to_dict(self) -> dict:
        return asdict(self)


def default_grid(transform: str) -> Grid:
    # Coarser grading suffices for logit's deep end (measured: same digits as ratio 2, 3x fewer panels).
    return make_grid(ratio=8.0, depth=DEEP) if transform == "logit" else make_grid()


def analyse_density(
    procedure: str,
    n: int,
    transform: str,
    *,
    kl: float | None = None,
    beta: float | None = None,
    t: float | None = None,
    lam: float | None = None,
    grid: Grid | None = None,
) -> tuple[TheoryResult, Density]:
    """Like ``analyse``, also returning the tilted density itself."""
    check_setting(procedure, n, transform, kl=kl, beta=beta, t=t, lam=lam)
    n = int(n)
    t = None if t is None else float(t)
    lam = None if lam is None else float(lam)
    grid = grid if grid is not None else default_grid(transform)
    if lam is not None:  # soft-BoN's kernels have width lam: no panel may be much wider
        grid = soft_bon_grid(grid, lam)
    if transform == "optimal":
        if kl is not None:
            log_beta, d = optimal_at_kl(grid, procedure, n, kl, lam)
        else:
            log_beta = math.log(beta)
            d = best_stationary_density(grid, procedure, n, log_beta, lam)
    elif transform in EXPONENTIAL and t is None:
        t, log_beta, d = best_t(grid, procedure, n, transform, kl, lam)
    elif kl is not None:
        log_beta, d = tilted_at_kl(grid, transform, kl, t)
    else:
        log_beta = math.log(beta)
        d = resolved_density(grid, lambda g: log_tilt(g, transform, log_beta, t))
    result = TheoryResult(
        procedure=procedure,
        n=n,
        transform=transform,
        kl=kl_divergence(d),
        beta=float(np.exp(log_beta)) if log_beta < 709.0 else None,
        log_beta=float(log_beta),
        t=None if t is None else float(t),
        win_rate=inference_win_rate(d, procedure, n, lam),
        standard_win_rate=standard_win_rate(d),
        lam=lam,
    )
    return result, d


def analyse(
    procedure: str,
    n: int,
    transform: str,
    *,
    kl: float | None = None,
    beta: float | None = None,
    t: float | None = None,
    lam: float | None = None,
) -> TheoryResult:
    """KL, beta, t and win rates of the policy tilted by ``transform`` (see the module docstring).

    Give exactly one of kl (a target, in nats) or beta. Without t the exp/negexp transforms use the
    best t for this procedure, N and KL; 'optimal' is the exact optimum over all policies (BoN,
    soft-BoN) or the best stationary point found (WoN). soft_bon needs its selection temperature
    lam. Raises ValueError for settings that make no sense.
    """
    return analyse_density(procedure, n, transform, kl=kl, beta=beta, t=t, lam=lam)[0]
