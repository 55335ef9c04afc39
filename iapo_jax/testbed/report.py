"""Testbed results as a markdown table and two figures: the measured points on the closed-form
win rate vs KL curves, and learning curves of the distance to the optimum against steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from iapo_jax.theory.curves import procedure_name


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def _floor(record: dict) -> str:
    """The reward floor in nats; '–' for none (records from before the floor have no key)."""
    nats = record.get("reward_floor_nats")
    return "–" if nats is None else f"{nats:g} nats"


def markdown_table(records: Sequence[dict]) -> str:
    """One row per run: the measured point, the optimum, the closed form, and the target verdict."""
    head = ["case", "transform", "option", "deployed as", "target KL", "beta", "t", "floor", "steps", "KL",
            "KL opt", "KL err", "W", "W opt", "W err", "closed form W at KL", "s", "target met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        row = [r["case"], r["transform"], r["option"], procedure_name(r["procedure"], r["n"]),
               _fmt(r["target_kl"]), _fmt(r["beta"]), _fmt(r["t"]), _floor(r), str(r["steps"]), f"{r['kl']:.4f}",
               f"{r['optimum_kl']:.4f}", f"{100 * r['kl_relative_error']:+.1f}%", f"{r['win_rate']:.4f}",
               f"{r['optimum_win_rate']:.4f}", f"{r['win_rate_error']:+.4f}",
               _fmt(r["closed_form_win_rate_at_kl"]), f"{r['seconds']:.0f}",
               "yes" if r["meets_target"] else "**no**"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_line(records: Sequence[dict]) -> str:
    met = sum(r["meets_target"] for r in records)
    worst_w = max(abs(r["win_rate_error"]) for r in records)
    worst_kl = max(abs(r["kl_relative_error"]) for r in records)
    return (f"{met} of {len(records)} runs meet |W - W_opt| <= 0.01 and |KL - KL_opt| <= 10% KL_opt; "
            f"largest |W - W_opt| {worst_w:.4f}, largest |KL - KL_opt| / KL_opt {100 * worst_kl:.1f}%")


def plot_points(records: Sequence[dict], path: str | Path) -> Path:
    """Measured (KL, W) and the optimum for each run over the closed-form curve of its transform."""
    import numpy as np
    from matplotlib.figure import Figure

    from iapo_jax.testbed.run import TRANSFORM_OF
    from iapo_jax.theory.analysis import analyse

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["case"], r["transform"]), []).append(r)
    fig = Figure(figsize=(4.2 * len(groups), 3.8))
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, ((case, transform), rs) in zip(axes, sorted(groups.items())):
        procedure, n = rs[0]["procedure"], rs[0]["n"]
        if transform != "raw":
            top = 1.3 * max(max(r["kl"], r["optimum_kl"]) for r in rs)
            kls = np.linspace(top / 40, top, 30)
            # exp / negexp: the curve of the t each run used (the best t at its target KL)
            ts = sorted({r["t"] for r in rs}, key=lambda v: (v is None, v))
            phi_name, lam = TRANSFORM_OF.get(transform, transform), rs[0].get("lam")
            for t in ts:
                wins = [analyse(procedure, n, phi_name, kl=float(k), t=t, lam=lam).win_rate for k in kls]
                label = "closed form" + ("" if t is None else f" (t={t:.3g})")
                ax.plot([0, *kls], [0.5, *wins], "-", linewidth=1, label=label)
        for option, marker in (("rloo", "o"), ("ppo", "s"), ("kl_in_loss", "^")):
            pts = [r for r in rs if r["option"] == option]
            if pts:
                ax.plot([r["kl"] for r in pts], [r["win_rate"] for r in pts], marker, fillstyle="none",
                        markersize=8, linestyle="none", label=f"trained ({option})")
        ax.plot([r["optimum_kl"] for r in rs], [r["optimum_win_rate"] for r in rs], "k+", markersize=10,
                linestyle="none", label="exact optimum")
        ax.set_title(f"{case}: {transform}", fontsize=10)
        ax.set_xlabel("KL(pi || pi_ref) [nats]")
        ax.set_ylabel(f"{procedure_name(procedure, n)} win rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_learning_curves(records: Sequence[dict], curves: Sequence[Sequence[dict]], path: str | Path) -> Path:
    """|W - W_opt| and KL(pi || pi_opt) against steps: one line per run, coloured by transform,
    dashed by option."""
    from matplotlib.figure import Figure

    transforms = sorted({r["transform"] for r in records})
    colours = {t: f"C{i}" for i, t in enumerate(transforms)}
    styles = {"rloo": "-", "ppo": "--", "kl_in_loss": ":"}
    fig = Figure(figsize=(10, 3.8))
    ax_w, ax_kl = fig.subplots(1, 2)
    labelled = set()
    for r, curve in zip(records, curves):
        key = (r["case"], r["transform"])
        label = None if key in labelled else f"{r['case']} {r['transform']}"
        labelled.add(key)
        style = dict(color=colours[r["transform"]], linestyle=styles.get(r["option"], "-"), linewidth=0.9)
        steps = [p["step"] for p in curve]
        ax_w.plot(steps, [abs(p["win_rate_gap"]) + 1e-5 for p in curve], **style)
        ax_kl.plot(steps, [p["kl_to_optimum"] + 1e-6 for p in curve], label=label, **style)
    ax_w.axhline(0.01, color="k", linestyle="--", linewidth=0.8)
    for ax, name in ((ax_w, "|W - W_opt|"), (ax_kl, "KL(pi || pi_opt) [nats]")):
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=7, title="solid rloo, dashed ppo, dotted KL in loss", title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
