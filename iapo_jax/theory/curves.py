"""Win rate versus KL curves for several transforms, as tables and as a matplotlib figure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from iapo_jax.theory.analysis import TheoryResult, analyse
from iapo_jax.theory.settings import FITS

PROCEDURE_NAMES = {"sampling": "sampling", "bon": "best-of-{n}", "won": "worst-of-{n}",
                   "soft_bon": "soft best-of-{n}"}
LABELS = {"exp": "exp (best t)", "negexp": "-exp (best t)"}


def procedure_name(procedure: str, n: int, lam: float | None = None) -> str:
    name = PROCEDURE_NAMES[procedure].format(n=n)
    return name if lam is None else f"{name} (lam {lam:g})"


def win_rate_curve(
    procedure: str,
    n: int,
    transform: str,
    kls: Iterable[float],
    t: float | None = None,
    lam: float | None = None,
) -> list[TheoryResult]:
    """The transform's results at each target KL (best t per KL for exp/negexp when t is None)."""
    return [analyse(procedure, n, transform, kl=float(kl), t=t, lam=lam) for kl in kls]


def transform_curves(
    procedure: str,
    n: int,
    kls: Sequence[float],
    transforms: Sequence[str] | None = None,
    lam: float | None = None,
) -> dict[str, list[TheoryResult]]:
    """One curve per transform that fits the procedure (all of them by default)."""
    names = transforms or FITS[procedure]
    return {name: win_rate_curve(procedure, n, name, kls, lam=lam) for name in names}


def markdown_table(results: Sequence[TheoryResult]) -> str:
    """One row per result: transform, t, beta, KL, the procedure's win rate, standard win rate."""
    lines = [
        "| procedure | transform | t | beta | KL | win rate | standard win rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = "" if r.t is None else f"{r.t:.4g}"
        beta = f"exp({r.log_beta:.2f})" if r.beta is None else f"{r.beta:.4g}"
        lines.append(
            f"| {procedure_name(r.procedure, r.n, r.lam)} | {r.transform} | {t} | {beta} | {r.kl:.4f} | "
            f"{r.win_rate:.4f} | {r.standard_win_rate:.4f} |"
        )
    return "\n".join(lines)


def plot_curves(
    panels: Sequence[tuple[str, int, dict[str, list[TheoryResult]]]],
    path: str | Path,
    *,
    mark: TheoryResult | None = None,
) -> Path:
    """Saves one subplot per (procedure, n, curves) with win rate against KL; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (procedure, n, curves) in zip(axes[0], panels):
        lam = next((r.lam for rs in curves.values() for r in rs), None)
        name_of = procedure_name(procedure, n, lam)
        for name, results in curves.items():
            label = LABELS.get(name, name)
            style = "k--" if name == "optimal" else "-"
            width = 2.5 if name in ("exp", "negexp") else 1.2  # visible under the optimum's dashes
            # every curve starts at pi_ref itself: KL 0, win rate 1/2
            kls, wins = [0.0] + [r.kl for r in results], [0.5] + [r.win_rate for r in results]
            ax.plot(kls, wins, style, marker=".", linewidth=width, label=label)
        if mark is not None and (mark.procedure, mark.n) == (procedure, n):
            ax.plot([mark.kl], [mark.win_rate], "r*", markersize=12, label=f"{mark.transform} (asked)")
        ax.set_xlabel("KL(pi || pi_ref) [nats]")
        ax.set_ylabel(f"{name_of} win rate vs pi_ref")
        ax.set_title(f"{name_of}: calibrated reward, closed form")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
