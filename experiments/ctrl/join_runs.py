"""Join several `iapo compare` runs that differ only in their methods into one report.

    python experiments/ctrl/join_runs.py RUN_DIR RUN_DIR ... --out DIR [--reference-pool POOL_DIR]

Runs with the same settings and seed sample the same prompts and reference pools, so methods
trained in separate runs (say ctrl and calibrated in one, raw and bon-distill in a second) are
compared as if trained in one: the same results.md, paired differences between every two methods,
learning curves and plots that `iapo compare` writes, or for sweeps the matched-KL read-out.
The script refuses runs whose settings (other than methods and pools_from) or held-out reference
pools differ; a run that added methods later with `--pools-from FIRST_RUN` shares the pools exactly.

The paired differences need the reference's held-out scores: the pool_eval folder of the first
run that has one,
or --reference-pool (checked against the runs' recorded fingerprint). A sweep joins without one
(the matched-KL table only); a single-target join refuses to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from iapo_jax.commands import compare as compare_job
from iapo_jax.commands.configs import recorded_config
from iapo_jax.data.fingerprint import fingerprint
from iapo_jax.evaluation.comparison import CompareConfig, write_results
from iapo_jax.rewards.calibration import ReferencePool


def load(run: Path) -> tuple[dict, dict]:
    manifest = json.loads((run / "manifest.json").read_text())
    # Runs recorded before warmup existed trained without it; None now means "10% of steps".
    manifest["config"].setdefault("warmup_steps", 0)
    # Keys added since a run was recorded: the values it ran with (reproduce's rule), else the default.
    defaults = {f.name: f.default for f in dataclasses.fields(CompareConfig) if f.default is not dataclasses.MISSING}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}  # as JSON records them
    manifest["config"] = {**defaults, **recorded_config(compare_job.JOB, manifest["config"])}
    rows = json.loads((run / "results.json").read_text())
    return manifest, rows


def joined(runs: list[Path]) -> tuple[CompareConfig, dict, str]:
    """The joined config, rows and the held-out pool's recorded fingerprint; SystemExit on a mismatch."""
    manifests, rows, methods = [], {}, []
    for run in runs:
        manifest, run_rows = load(run)
        manifests.append(manifest)
        twice = [m for m in manifest["config"]["methods"] if m in methods]
        if twice:
            raise SystemExit(f"{run}: methods {twice} are in an earlier run too; join runs of different methods")
        methods += manifest["config"]["methods"]
        rows.update(run_rows)  # the reference rows are identical when the pools are
    free = ("methods", "pools_from")  # where the pools came from does not change them (fingerprints checked)
    first = {k: v for k, v in manifests[0]["config"].items() if k not in free}
    for run, manifest in zip(runs[1:], manifests[1:]):
        other = {k: v for k, v in manifest["config"].items() if k not in free}
        if other != first:
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise SystemExit(f"{run}: settings differ from {runs[0]} in {diff}; only methods may differ")
        if manifest["data"]["pool_eval"] != manifests[0]["data"]["pool_eval"]:
            raise SystemExit(f"{run}: its held-out reference pool differs from {runs[0]}'s")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in first.items()}
    cfg = CompareConfig(**config, methods=tuple(methods)).validate()
    return cfg, rows, manifests[0]["data"]["pool_eval"]["sha256"]


def reference_pool(runs: list[Path], given: Path | None, recorded_sha: str) -> ReferencePool | None:
    path = given or next((r / "pool_eval" for r in runs if (r / "pool_eval").is_dir()), None)
    if path is None:
        return None
    pool = ReferencePool.load(path)
    if fingerprint(pool.fingerprint()) != recorded_sha:  # compare records the digest of the pool's own
        raise SystemExit(f"{path} is not the pool the runs were evaluated against (fingerprints differ)")
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference-pool", type=Path, default=None,
                        help="the runs' held-out reference pool (default: the pool_eval folder of the first run that has one)")
    args = parser.parse_args()
    cfg, rows, pool_sha = joined(args.runs)
    pool = reference_pool(args.runs, args.reference_pool, pool_sha)
    if pool is None and not cfg.is_sweep:
        raise SystemExit("no held-out reference pool: the paired differences need it. Pass --reference-pool "
                         "with the pool_eval folder of one of the runs")
    # The judges' scores of the reference's samples, as compare recorded them.
    judged = {j: (None, np.asarray(rows["reference"]["judges"][j]["scores"])) for j in cfg.judges}
    args.out.mkdir(parents=True, exist_ok=True)
    text, _ = write_results(cfg, rows, None if pool is None else pool.scores, args.out, judged)
    print(text)


if __name__ == "__main__":
    main()
