"""Win rate vs KL for best-of-4 and worst-of-4 across reward transforms, from the analytic tool.

    python experiments/theory/win_rate_vs_kl.py [--n 4] [--out experiments/theory]

Writes win_rate_vs_kl_n<N>.png (one panel per procedure), table_n<N>.md (the paper-like table at
KL 0.5, 1, 2 and every curve point) and results_n<N>.json (all numbers, the settings and the
software versions). Everything is deterministic: a rerun gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from iapo_jax.theory.analysis import analyse
from iapo_jax.theory.curves import markdown_table, plot_curves, procedure_name, transform_curves

CURVE_KLS = [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
TABLE_KLS = [0.5, 1.0, 2.0]
TABLE_COLUMNS = {
    "bon": ("identity", "log", "logit", "exp", "optimal"),
    "won": ("identity", "log", "logit", "negexp", "optimal"),
}
HEADERS = {"exp": "exp (best t)", "negexp": "-exp (best t)"}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "matplotlib", "iapo-jax"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def paper_table(n: int) -> tuple[str, list[dict]]:
    rows, records = [], []
    header = ["KL"] + [
        f"{procedure_name(p, n)} {HEADERS.get(t, t)}" for p, ts in TABLE_COLUMNS.items() for t in ts
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kl in TABLE_KLS:
        cells = [f"{kl:g}"]
        for procedure, transforms in TABLE_COLUMNS.items():
            for transform in transforms:
                r = analyse(procedure, n, transform, kl=kl)
                records.append(r.to_dict())
                cells.append(f"{100 * r.win_rate:.2f}" + (f" (t={r.t:.3g})" if r.t is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    rows = "\n".join(lines)
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    start = time.perf_counter()

    curves = {p: transform_curves(p, args.n, CURVE_KLS, TABLE_COLUMNS[p]) for p in TABLE_COLUMNS}
    panels = [(p, args.n, c) for p, c in curves.items()]
    plot = plot_curves(panels, args.out / f"win_rate_vs_kl_n{args.n}.png")
    table, table_records = paper_table(args.n)
    gaps = []
    for record in table_records:
        if record["transform"] in ("exp", "negexp"):
            best = next(r for r in table_records if r["procedure"] == record["procedure"]
                        and r["transform"] == "optimal" and abs(r["kl"] - record["kl"]) < 1e-6)
            gaps.append(f"- {procedure_name(record['procedure'], args.n)}, KL {record['kl']:.3g}: "
                        f"{record['transform']} with t = {record['t']:.4g} is "
                        f"{100 * (best['win_rate'] - record['win_rate']):.3f} points below the optimum")
    seconds = time.perf_counter() - start

    md = [
        f"# Win rate vs KL on a calibrated reward, N = {args.n} (closed form)",
        "",
        "Win rates (in %) of the tilted policy against pi_ref under the same inference-time procedure,",
        "at a target KL(pi || pi_ref) in nats. exp / -exp use the best t for that N and KL;",
        "'optimal' is the exact optimum over all policies (best-of-N) or the best stationary point",
        "found (worst-of-N). Ties have probability zero.",
        "",
        table,
        "",
        "Gap between the exponential transform with its best t and the optimum:",
        "",
        *gaps,
        "",
        "## Every curve point",
        "",
        *[markdown_table(results) + "\n" for c in curves.values() for results in c.values()],
        (
            f"Computed in {seconds:.0f} s on {platform.machine()} (CPU); "
            f"`python experiments/theory/win_rate_vs_kl.py --n {args.n}` reproduces it."
        ),
    ]
    (args.out / f"table_n{args.n}.md").write_text("\n".join(md) + "\n")
    record = {
        "command": f"python experiments/theory/win_rate_vs_kl.py --n {args.n}",
        "n": args.n,
        "curve_kls": CURVE_KLS,
        "table_kls": TABLE_KLS,
        "seconds": round(seconds, 1),
        "versions": versions(),
        "table": table_records,
        "curves": {p: {t: [r.to_dict() for r in rs] for t, rs in c.items()} for p, c in curves.items()},
    }
    (args.out / f"results_n{args.n}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    print("\n".join(gaps))
    print(f"wrote {plot} and {args.out / f'table_n{args.n}.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
