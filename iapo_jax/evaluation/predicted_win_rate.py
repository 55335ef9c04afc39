"""The closed form's win rate for a trained method at the KL it was measured at.

The comparison's tables and learning curves and the sweep's matched-KL table and plot all put this
prediction beside the measured win rate, so it lives below both.
"""

from __future__ import annotations

from iapo_jax.theory.analysis import analyse


def predicted_win_rate(method: str, cfg, kl: float, t: float | None = None) -> float | None:
    """The analytic tool's W^T for the method's transform at the measured KL (None for raw).

    cfg: a CompareConfig. t: CTRL's transform parameter; unset = cfg.t, or the best t at this KL
    when that is unset too.
    """
    transform = cfg.ctrl_config(method).transform
    if transform == "raw" or not (kl > 1e-4):
        return None
    t = (t if t is not None else cfg.t) if method == "ctrl" else None
    try:
        return float(analyse(cfg.procedure, cfg.deploy_n, transform, kl=kl, t=t, lam=cfg.lam).win_rate)
    except (ValueError, ArithmeticError):
        return None
