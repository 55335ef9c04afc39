"""Win rate against KL over a beta sweep: the settings of each point, the matched-KL read-out, the plot.

A sweep trains every method once per point with beta held fixed. Points are given either as betas
(the same beta for every method) or as KLs: then each method gets the beta whose KL-optimal tilted
policy has exactly that KL for its own transform (algorithms.md §4), so every method's curve spans
the same KL range although the transforms' beta units differ by orders of magnitude (-exp(-16u)
reaches KL 1 at a beta ~5000x smaller than the identity). Trained policies stop short of the
optimum, so the measured KL is what the curves are drawn against.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from iapo_jax.evaluation.predicted_win_rate import predicted_win_rate


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One (method, beta) training run of a sweep."""

    method: str
    transform: str
    beta: float  # in the trainer's units (exp / negexp rescaled onto [0, 1])
    t: float | None  # CTRL's transform parameter (None for the other transforms)
    kl: float | None  # the KL this beta was chosen for (None for an explicit beta)

    @property
    def name(self) -> str:
        return f"{self.method}@beta={self.beta:.3g}"


def trainer_beta(procedure: str, n: int, transform: str, kl: float) -> tuple[float, float | None]:
    """(beta, t) whose KL-optimal policy has KL `kl`, with beta in the trainer's reward units.

    The analytic tool measures beta in the units of Phi as algorithms.md writes it; the trainer
    rescales exp(tu) to (e^{tu} - 1) / (e^t - 1) and -exp(-tu) to (1 - e^{-tu}) / (1 - e^{-t}),
    which divides beta by e^t - 1 and 1 - e^{-t} respectively. Raw rewards have no closed form; they
    get the identity's beta (both are rewards of order one). The optimal transform is the optimum
    solved at `kl` itself, log f* rescaled onto [0, 1], so its beta is 1 / (max - min of log f*).
    """
    from iapo_jax.rewards.transforms import optimal_table, unit_range_scale
    from iapo_jax.theory.analysis import analyse

    if transform == "optimal":  # the optimum solved at this KL, rescaled onto [0, 1] by its range
        return 1.0 / optimal_table(procedure, n, kl=kl).log_f_range, None
    result = analyse(procedure, n, "identity" if transform == "raw" else transform, kl=kl)
    return math.exp(result.log_beta - math.log(unit_range_scale(transform, result.t))), result.t


def sweep_points(cfg) -> list[SweepPoint]:
    """The (method, beta) runs of a CompareConfig with `betas` or `sweep_kls` set."""
    from iapo_jax.alignment.ctrl import resolve_t

    points = []
    for method in cfg.methods:
        transform = cfg.ctrl_config(method).transform
        if cfg.sweep_kls:
            for kl in cfg.sweep_kls:
                beta, t = trainer_beta(cfg.procedure, cfg.deploy_n, transform, kl)
                if method == "ctrl" and cfg.t is not None:
                    t = float(cfg.t)
                points.append(SweepPoint(method, transform, beta, t if method == "ctrl" else None, kl))
        else:
            t = resolve_t(cfg.ctrl_config(method))
            points.extend(SweepPoint(method, transform, float(b), t, None) for b in cfg.betas)
    return points


def curve(rows: dict[str, dict], method: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(KL, W, W low, W high) of one method's measured sweep rows, sorted by KL.

    pi_ref's own point (KL 0, W 1/2) is not part of a curve: it is exact, but the straight line
    from it to the first measured point is not a measurement, and its zero-width "interval" made
    read-outs below that point look far more certain than they are.
    """
    pts = []
    for r in rows.values():
        if r.get("method") == method and "beta" in r:
            w = r["win_rates"][key]
            pts.append((max(r["kl"], 0.0), w["win_rate"], w["ci_low"], w["ci_high"]))
    pts.sort()
    if not pts:
        return tuple(np.zeros(0) for _ in range(4))  # type: ignore[return-value]
    return tuple(np.asarray(c, np.float64) for c in zip(*pts))  # type: ignore[return-value]


def curve_t(cfg, rows: dict[str, dict], method: str) -> float | None:
    """CTRL's t along a closed-form curve: the sweep's own (one t for explicit betas), or None for
    a sweep by KL, whose points each use the best t at their KL, as the curve then does too."""
    if cfg.t is not None or cfg.sweep_kls:
        return cfg.t
    return next((r.get("t") for r in rows.values() if r.get("method") == method), None)


BELOW_FIRST_POINT = "below first point"  # a cell not read out: see matched_kl_table


def matched_kl_table(cfg, rows: dict[str, dict], kls: Sequence[float] | None = None) -> str:
    """Markdown: each method's win rate linearly interpolated along its sweep curve at common KLs.

    The KLs are the sweep's own (or the measured KLs) up to the smallest largest-measured KL of
    the methods. A method is read out only between its first and last measured KL: below its first
    point a cell says so (BELOW_FIRST_POINT) rather than interpolated towards pi_ref's (0, 1/2), which
    would come with a made-up, too narrow interval. Interval ends are interpolated the same way as
    the win rates, so they are approximate.
    """
    key = f"{cfg.procedure}@{cfg.deploy_n}"
    methods = swept_methods(cfg, rows)
    curves = {m: curve(rows, m, key) for m in methods}
    reach = min((c[0][-1] for c in curves.values()), default=0.0)
    if kls is None:
        kls = read_out_kls(cfg, rows)
    kls = [k for k in kls if 0 < k <= reach]
    proc = f"{cfg.procedure.upper()}_{cfg.deploy_n}"
    head = ("| KL (nats) | " + " | ".join(f"{m}: W ({proc})" for m in methods) + " | "
            + " | ".join(f"{m}: predicted" for m in methods) + " |\n|---|"
            + "---|" * (2 * len(methods)) + "\n")
    lines = []
    for k in kls:
        cells = []
        for m in methods:
            x, w, lo, hi = curves[m]
            cells.append(BELOW_FIRST_POINT if k < x[0] else
                         f"{np.interp(k, x, w):.3f} [{np.interp(k, x, lo):.3f}, {np.interp(k, x, hi):.3f}]")
        if all(c == BELOW_FIRST_POINT for c in cells):
            continue
        preds = []
        for m in methods:
            p = predicted_win_rate(m, cfg, k, curve_t(cfg, rows, m))
            preds.append("–" if p is None else f"{p:.3f}")
        lines.append(f"| {k:.2f} | " + " | ".join(cells) + " | " + " | ".join(preds) + " |")
    if not lines:
        return head + f"| (no KL that every method reached: common reach {reach:.2f}) |\n"
    firsts = ", ".join(f"{m} {curves[m][0][0]:.2f}" for m in methods)
    note = (f"\nFirst measured KL per method: {firsts}. Below it a method is not read out (no "
            "interpolation towards the reference's (0, 1/2)).\n")
    return head + "\n".join(lines) + "\n" + note


def plot_sweep(cfg, rows: dict[str, dict], path: Path) -> None:
    """W^{T_N}(pi > pi_ref) against the measured KL for each method, over the analytic curves."""
    from matplotlib.figure import Figure

    key = f"{cfg.procedure}@{cfg.deploy_n}"
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    top = 0.0
    for i, method in enumerate(cfg.methods):
        x, w, lo, hi = curve(rows, method, key)
        if len(x) < 1:
            continue
        top = max(top, float(x[-1]))
        color = f"C{i}"
        ax.errorbar(x, w, yerr=[w - lo, hi - w], marker="o", capsize=3, color=color, label=f"{method} (measured)")
    ax.plot([0.0], [0.5], marker="s", color="grey", ls="none", label="reference (KL 0, W 1/2)")
    grid = np.linspace(0.02, max(top, 0.1) * 1.1, 24)
    for i, method in enumerate(cfg.methods):
        if cfg.ctrl_config(method).transform == "raw":
            continue
        t = curve_t(cfg, rows, method)
        preds = [predicted_win_rate_or_nan(method, cfg, k, t) for k in grid]
        ax.plot(np.r_[0.0, grid], np.r_[0.5, preds], ls="--", color=f"C{i}", lw=1,
                label=f"{method} (closed form, optimal tilt)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("KL(pi || pi_ref) on held-out prompts [nats]")
    proc = "best" if cfg.procedure == "bon" else "worst"
    ax.set_ylabel(f"{proc}-of-{cfg.deploy_n} win rate vs reference")
    ax.set_title(f"beta sweep: {cfg.reward} reward, {Path(str(cfg.model)).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def predicted_win_rate_or_nan(method, cfg, kl, t) -> float:
    p = predicted_win_rate(method, cfg, float(kl), t)
    return float("nan") if p is None else p


def swept_methods(cfg, rows: dict[str, dict]) -> list[str]:
    """The config's methods that have at least one sweep point among the rows."""
    return [m for m in cfg.methods if any(r.get("method") == m and "beta" in r for r in rows.values())]


def read_out_kls(cfg, rows: dict[str, dict]) -> list[float]:
    """The KLs a sweep is read at: its own sweep KLs, or the measured KLs of an explicit-beta one."""
    if cfg.sweep_kls:
        return sorted(cfg.sweep_kls)
    return sorted({round(r["kl"], 2) for r in rows.values() if "beta" in r})


def write_sweep_report(cfg, rows: dict[str, dict], run_dir: Path, reference_scores=None) -> str:
    """matched_kl.md and win_rate_vs_kl.png in run_dir (also to re-render them from results.json).

    With the reference's evaluation scores and two or more methods, also the differences between
    methods at each KL, paired over prompts (matched_kl_differences.md / .json)."""
    from iapo_jax.evaluation.matched_kl import matched_kl_differences, matched_kl_differences_table

    run_dir = Path(run_dir)
    matched = matched_kl_table(cfg, rows)
    methods = swept_methods(cfg, rows)
    if reference_scores is not None and len(methods) > 1:
        diffs = matched_kl_differences(rows, methods, np.asarray(reference_scores), cfg.procedure, cfg.deploy_n,
                                       read_out_kls(cfg, rows), seed=cfg.seed, lam=cfg.lam)
        (run_dir / "matched_kl_differences.json").write_text(json.dumps(diffs, indent=1) + "\n")
        matched += ("\nDifferences at matched KL, each method read along its sweep line; prompts "
                    "resampled jointly for every point of every method (paired bootstrap):\n\n"
                    + matched_kl_differences_table(diffs))
    (run_dir / "matched_kl.md").write_text(matched)
    plot_sweep(cfg, rows, run_dir / "win_rate_vs_kl.png")
    return matched
