"""Soft best-of-4 on a calibrated reward, closed form: win rates of the KL-optimal tilted policies
(identity, exp with its best t, the exact optimum) at several selection temperatures lam, next to
best-of-4's optimum, and the win rate vs KL curves at lam = 0.1.

    python experiments/theory/soft_bon.py      # writes experiments/results/soft_bon.{md,png}
"""

from pathlib import Path

from iapo_jax.theory import analyse, plot_curves, transform_curves

OUT = Path(__file__).resolve().parents[1] / "results"
N, KLS, LAMS = 4, (0.5, 1.0, 2.0), (0.05, 0.1, 0.3)


def main() -> None:
    lines = ["| lam | KL | identity | exp (best t) | optimum | best-of-4 optimum |", "|---|---|---|---|---|---|"]
    for lam in LAMS:
        for kl in KLS:
            ident = analyse("soft_bon", N, "identity", kl=kl, lam=lam)
            exp = analyse("soft_bon", N, "exp", kl=kl, lam=lam)
            opt = analyse("soft_bon", N, "optimal", kl=kl, lam=lam)
            bon = analyse("bon", N, "optimal", kl=kl)
            lines.append(f"| {lam:g} | {kl:g} | {100 * ident.win_rate:.2f} | {100 * exp.win_rate:.2f} "
                         f"(t = {exp.t:.3g}) | {100 * opt.win_rate:.2f} | {100 * bon.win_rate:.2f} |")
            print(lines[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    head = ("# Soft best-of-4, closed form\n\nWin rates (%) of soft-BoN_4(pi) against soft-BoN_4(pi_ref) "
            "for the KL-optimal policy of each transform, from `iapo theory --procedure soft_bon`.\n\n")
    (OUT / "soft_bon.md").write_text(head + "\n".join(lines) + "\n")
    curves = transform_curves("soft_bon", N, [0.25, 0.5, 1.0, 1.5, 2.0], ("identity", "exp", "optimal"), lam=0.1)
    plot_curves([("soft_bon", N, curves)], OUT / "soft_bon.png")


if __name__ == "__main__":
    main()
