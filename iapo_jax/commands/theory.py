"""``iapo theory``: closed-form KL and inference-time win rates of a reward-tilted policy.

    iapo theory --procedure bon --n 4 --kl 1 --transform exp          # best t at KL 1
    iapo theory --procedure won --n 4 --beta 0.05 --transform optimal --json
    iapo theory --procedure bon --n 32 --kl 2 --plot curves.png
    iapo theory --procedure soft_bon --n 4 --lam 0.1 --kl 1 --transform exp

On a calibrated reward (Uniform[0, 1] under pi_ref) a policy tilted by Phi(u)/beta is a density on
[0, 1], the same for every prompt, model and reward, so KL and win rates have closed forms
(algorithms.md §4). The table also compares every transform that fits the procedure at the same KL;
--json prints one JSON object (kl, beta, log_beta, t, win_rate, standard_win_rate, ...) instead.
"""

from __future__ import annotations

import dataclasses
import json as json_lib
import sys
from pathlib import Path
from typing import Literal

from iapo_jax.theory.settings import check_setting
from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import current_context
from iapo_jax.commands.job_inputs import check_output_file
from iapo_jax.commands.job_outputs import write_text

DEFAULT_TRANSFORM = {"sampling": "identity", "bon": "exp", "won": "negexp", "soft_bon": "exp"}
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
RESULT_FILE = "theory.json"


@dataclasses.dataclass(frozen=True)
class TheoryConfig:
    """Closed-form KL and win rates of a policy tilted by a transform of the calibrated reward."""

    procedure: Literal["sampling", "bon", "won", "soft_bon"] = "bon"
    """Inference-time procedure: plain sampling, best-of-N, worst-of-N or soft best-of-N (serves
    response i with probability softmax(u / lam)_i)."""
    n: int | None = None
    """N responses per prompt at inference (default: 4 for bon/won/soft_bon; sampling is N = 1)."""
    lam: float | None = None
    """soft_bon's selection temperature on the calibrated reward (lam -> 0: best-of-N; lam -> inf:
    sampling); required for soft_bon, refused otherwise."""
    kl: float | None = None
    """Target KL(pi || pi_ref) in nats; beta is solved for it. Give kl or beta."""
    beta: float | None = None
    """KL weight of the tilted policy pi ∝ pi_ref exp(Phi(u)/beta). Give kl or beta."""
    transform: Literal["identity", "log", "logit", "exp", "negexp", "optimal"] | None = None
    """Reward transform Phi (default: exp for bon, negexp for won, identity for sampling);
    'optimal' is the exact optimum for bon and the best stationary point for won."""
    t: float | None = None
    """Exponent of exp(t u) / -exp(-t u) (default: the best t for this N and KL)."""
    json: bool = False
    """Print one JSON object instead of tables."""
    plot: Path | None = None
    """Save win rate vs KL curves of every fitting transform here (.png, .pdf or .svg)."""
    compare: bool = True
    """Also compute every other transform that fits the procedure at the same KL."""


def resolved(cfg: TheoryConfig) -> tuple[str, int, str]:
    """(procedure, n, transform) with defaults filled in; raises ValueError for bad input."""
    n = cfg.n if cfg.n is not None else (1 if cfg.procedure == "sampling" else 4)
    transform = cfg.transform or DEFAULT_TRANSFORM.get(cfg.procedure, "identity")
    check_setting(cfg.procedure, n, transform, kl=cfg.kl, beta=cfg.beta, t=cfg.t, lam=cfg.lam)
    if cfg.plot is not None and Path(cfg.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot {cfg.plot}: use a file name ending in {', '.join(PLOT_SUFFIXES)}")

    check_output_file(cfg.plot, "--plot")
    return cfg.procedure, n, transform


def _curve_kls(kl: float) -> list[float]:
    top = max(2.0, 1.5 * kl)
    return [round(top * k / 10, 6) for k in range(1, 11)]


def run(cfg: TheoryConfig) -> dict:
    procedure, n, transform = resolved(cfg)  # every check before any compute
    from iapo_jax.theory.analysis import analyse, analyse_density
    from iapo_jax.theory.curves import markdown_table, plot_curves, procedure_name, transform_curves
    from iapo_jax.theory.settings import FITS
    from iapo_jax.theory.win_rates import served_law

    lam = cfg.lam
    result, density = analyse_density(procedure, n, transform, kl=cfg.kl, beta=cfg.beta, t=cfg.t,
                                      lam=lam)
    out = result.to_dict()
    out["served"] = served_law(density, procedure, n, lam)
    comparison, skipped = [], []
    if cfg.compare:
        for other in FITS[procedure]:
            if other == transform:
                continue
            try:
                comparison.append(analyse(procedure, n, other, kl=result.kl, lam=lam))
            except ValueError as err:  # e.g. a KL the logit tilt cannot reach on the grid
                skipped.append(f"{other}: {err}")
        out["comparison"] = [r.to_dict() for r in comparison]
    if cfg.plot is not None:
        curves = transform_curves(procedure, n, _curve_kls(result.kl), lam=lam)
        out["plot"] = str(plot_curves([(procedure, n, curves)], cfg.plot, mark=result))

    if cfg.json:
        print(json_lib.dumps(out, indent=2))
    else:
        name = procedure_name(procedure, n, lam)
        print(f"{name} with the {transform} transform (calibrated reward, closed form)")
        print(markdown_table([result]))
        law = out["served"]
        print(f"\nserved calibrated reward: mean {law['policy_mean']:.4f} (pi_ref: "
              f"{law['reference_mean']:.4f}); CDF at u = {', '.join(f'{u:g}' for u in law['u'])}: "
              f"{', '.join(f'{c:.4f}' for c in law['policy_cdf'])} (pi_ref: "
              f"{', '.join(f'{c:.4f}' for c in law['reference_cdf'])})")
        if comparison:
            print(f"\nEvery transform that fits {name}, at KL {result.kl:.4g}:")
            print(markdown_table(sorted([result, *comparison], key=lambda r: r.win_rate)))
        for line in skipped:
            print(f"(skipped {line})", file=sys.stderr)
        if cfg.plot is not None:
            print(f"\nwin rate vs KL curves: {out['plot']}")
    ctx = current_context()
    if ctx is not None:

        write_text(ctx.run_dir / RESULT_FILE, json_lib.dumps(out, indent=2) + "\n")
        ctx.fingerprint_output("result", RESULT_FILE)
    return out


if __name__ == "__main__":
    import tyro

    run(tyro.cli(TheoryConfig))


JOB = JobSpec(config=TheoryConfig, run=run, single_process=True)  # closed forms: nothing to spread
