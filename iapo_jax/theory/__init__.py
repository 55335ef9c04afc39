"""Closed-form KL and win rates of reward-tilted policies on a calibrated reward (algorithms.md §4).

    from iapo_jax.theory import analyse
    r = analyse("bon", 4, "exp", kl=1.0)     # r.t, r.beta, r.win_rate, r.standard_win_rate

Layers, each in its own module: quadrature (graded Gauss-Legendre grid), tilts (Phi/beta),
densities (f, F), win_rates (KL and W^T), optimum (exact fixed point), solvers (beta at a KL,
best t), analysis (one question, one answer), curves (tables and plots).
"""

from iapo_jax.theory.analysis import TheoryResult, analyse, analyse_density
from iapo_jax.theory.curves import markdown_table, plot_curves, transform_curves, win_rate_curve
from iapo_jax.theory.settings import FITS, PROCEDURES, TRANSFORMS, check_setting

__all__ = [
    "FITS",
    "PROCEDURES",
    "TRANSFORMS",
    "TheoryResult",
    "analyse",
    "analyse_density",
    "check_setting",
    "markdown_table",
    "plot_curves",
    "transform_curves",
    "win_rate_curve",
]
