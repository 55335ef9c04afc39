"""Join the rows of several `iapo compare` sweep runs that differ only in their methods.

    python experiments/ctrl/merge_sweeps.py RUN_DIR RUN_DIR ... --out DIR

Runs with the same settings and seed sample the same reference pools, so their rows share one
reference and their curves can be drawn and read at matched KL together. The script refuses runs
whose settings (other than methods) or held-out reference pools differ, then writes the joined
results.json, matched_kl.md and win_rate_vs_kl.png to DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iapo_jax.evaluation.comparison import CompareConfig
from iapo_jax.evaluation.kl_sweep import write_sweep_report


def load(run: Path) -> tuple[dict, dict]:
    manifest = json.loads((run / "manifest.json").read_text())
    # Runs recorded before warmup existed trained without it; None now means "10% of steps".
    manifest["config"].setdefault("warmup_steps", 0)
    rows = json.loads((run / "results.json").read_text())
    return manifest, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    manifests, rows, methods = [], {}, []
    for run in args.runs:
        manifest, run_rows = load(run)
        manifests.append(manifest)
        twice = [m for m in manifest["config"]["methods"] if m in methods]
        if twice:
            raise SystemExit(f"{run}: methods {twice} are in an earlier run too; join runs of different methods")
        methods += manifest["config"]["methods"]
        rows.update(run_rows)  # the reference rows are identical when the pools are
    first = {k: v for k, v in manifests[0]["config"].items() if k != "methods"}
    for run, manifest in zip(args.runs[1:], manifests[1:]):
        other = {k: v for k, v in manifest["config"].items() if k != "methods"}
        if other != first:
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise SystemExit(f"{run}: settings differ from {args.runs[0]} in {diff}; only methods may differ")
        if manifest["data"]["pool_eval"] != manifests[0]["data"]["pool_eval"]:
            raise SystemExit(f"{run}: its held-out reference pool differs from {args.runs[0]}'s")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in first.items()}
    cfg = CompareConfig(**config, methods=tuple(methods)).validate()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    print(write_sweep_report(cfg, rows, args.out))


if __name__ == "__main__":
    main()
