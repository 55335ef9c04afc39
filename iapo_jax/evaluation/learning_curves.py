"""Learning curves of a compare run: each method's probed win rate against pi_ref under the
deployment, next to the analytic tool's win rate at the probe's own KL, by training step.

The gap (prediction - measurement) says whether a method closes on the optimum its objective
predicts, and how fast; the KL column shows how the budget is spent on the way.
"""

from __future__ import annotations

import itertools
from pathlib import Path


def curves_table(cfg, rows: dict[str, dict]) -> str:
    proc = f"{cfg.procedure.upper()}_{cfg.deploy_n}"
    judges = list(getattr(cfg, "judges", ()))
    lines = [f"| method | step | KL (nats) | W (sampling) | W ({proc}) | predicted W ({proc}) at this KL | "
             "gap |" + "".join(f" W ({proc}) judged by {j} |" for j in judges),
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(judges)]
    for name, r in rows.items():
        for c in r.get("curve", ()):
            pred = "–" if c["predicted"] is None else f"{c['predicted']:.3f}"
            gap = "–" if c["gap"] is None else f"{c['gap']:+.3f}"
            judged = "".join(f" {c['judges'][j]:.3f} |" for j in judges)
            lines.append(f"| {name} | {c['step']} | {c['kl']:.3f} | {c['win_rate_sampling']:.3f} | "
                         f"{c['win_rate']:.3f} | {pred} | {gap} |{judged}")
    return "\n".join(lines) + "\n"


def plot_curves(cfg, rows: dict[str, dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: notebooks keep their backend

    fig = Figure(figsize=(9, 3.6))
    ax_w, ax_kl = fig.subplots(1, 2)
    for i, (name, r) in enumerate((n, r) for n, r in rows.items() if r.get("curve")):
        color = f"C{i}"
        steps = [c["step"] for c in r["curve"]]
        ax_w.plot(steps, [c["win_rate"] for c in r["curve"]], "o-", color=color, label=name)
        pred = [(c["step"], c["predicted"]) for c in r["curve"] if c["predicted"] is not None]
        if pred:
            ax_w.plot(*zip(*pred), "--", color=color, alpha=0.7, label=f"{name}: predicted at its KL")
        for judge, style in zip(getattr(cfg, "judges", ()), itertools.cycle(("s:", "^-.", "v:", "d-."))):
            ax_w.plot(steps, [c["judges"][judge] for c in r["curve"]], style, color=color, alpha=0.8,
                      label=f"{name}: judged by {judge}")
        ax_kl.plot(steps, [c["kl"] for c in r["curve"]], "o-", color=color, label=name)
    if cfg.target_kl:
        ax_kl.axhline(cfg.target_kl, color="grey", lw=0.8, ls=":", label="target KL")
    ax_w.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_w.set(xlabel="step", ylabel=f"win rate vs pi_ref ({cfg.procedure}-{cfg.deploy_n})")
    ax_kl.set(xlabel="step", ylabel="KL(pi || pi_ref), nats")
    ax_w.legend(fontsize=7)
    ax_kl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_learning_curves(cfg, rows: dict[str, dict], run_dir: Path) -> None:
    (run_dir / "learning_curves.md").write_text(curves_table(cfg, rows))
    plot_curves(cfg, rows, run_dir / "learning_curves.png")
