"""Read 150-step comparisons at several KL targets as sweeps, paired at matched KL.

    python experiments/ctrl/read_150_runs_at_matched_kl.py \
        experiments/results/ctrl/ctrl-bon4-vader-150 experiments/results/ctrl/ctrl-bon4-vader-150-kl025 \
        experiments/results/ctrl/ctrl-bon4-vader-150-kl1 \
        --reference-pool experiments/results/ctrl/bon4-vader-150-matched/pool_eval \
        --kls 0.3 0.4 0.5 0.6 --out experiments/results/ctrl/bon4-vader-150-matched

Written for the best-of-4 runs at targets 0.5 and 1, which did not land both methods on their
targets; it reads any runs of one config at several targets (best- or worst-of-N, as the runs
were deployed). The runs share their prompts, calibration pool
and reference evaluation samples (the manifests' fingerprints are checked), so each method's end
points form a line through (KL, W). Each method is read on its line at the KLs asked for, with
the paired bootstrap of evaluation.matched_kl. A run recorded before per-prompt KLs existed gives
each prompt its run's mean KL, so that run's points do not move between replicates: the interval
then leaves out the noise in where those points sit, and is too narrow by that much.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from iapo_jax.data.fingerprint import fingerprint
from iapo_jax.evaluation.matched_kl import matched_kl_differences, matched_kl_differences_table
from iapo_jax.rewards.calibration import ReferencePool

SHARED = ("train_prompts", "eval_prompts", "pool_train", "pool_eval")


def load_points(run_dirs: list[Path]) -> tuple[dict, str, tuple[str, int], list[str]]:
    """Every method's end point in every run, the shared evaluation pool's fingerprint, the runs'
    deployment (procedure, N), and notes."""
    rows, fingerprints, deployments, notes = {}, None, set(), []
    for run_dir in run_dirs:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        shared = {k: manifest["data"][k]["sha256"] for k in SHARED}
        if fingerprints is not None and shared != fingerprints:
            raise SystemExit(f"{run_dir} used other prompts or pools than {run_dirs[0]}: not paired")
        fingerprints = shared
        results = json.loads((run_dir / "results.json").read_text())
        target = manifest["config"]["target_kl"]
        deployments.add((manifest["config"]["procedure"], manifest["config"]["deploy_n"]))
        for name, row in results.items():
            if name == "reference":
                continue
            row = dict(row, beta=target)  # a point of the method's two-point line
            if "kl_per_prompt" not in row:
                row["kl_per_prompt"] = [row["kl"]] * len(row["scores"])
                notes.append(f"{name} at target {target}: per-prompt KLs not recorded, each prompt given "
                             f"the run's mean KL {row['kl']:.3f}")
            rows[f"{name}@target={target}"] = row
    if len(deployments) > 1:
        raise SystemExit(f"the runs were deployed differently ({sorted(deployments)}): not one comparison")
    return rows, fingerprints["pool_eval"], deployments.pop(), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference-pool", type=Path, required=True,
                        help="the runs' shared evaluation pool (a pool_eval folder of one of the runs)")
    parser.add_argument("--kls", nargs="+", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, pool_sha, (procedure, n), notes = load_points(args.runs)
    pool = ReferencePool.load(args.reference_pool)
    if fingerprint(pool.fingerprint()) != pool_sha:  # compare records the digest of the pool's own
        raise SystemExit(f"{args.reference_pool} is not the pool the runs were evaluated against")
    reference = np.asarray(pool.scores)
    methods = list(dict.fromkeys(r["method"] for r in rows.values()))
    diffs = matched_kl_differences(rows, methods, reference, procedure, n, args.kls)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matched_kl_differences.json").write_text(json.dumps({"runs": [str(r) for r in args.runs],
                                                                      "notes": notes, "rows": diffs}, indent=1) + "\n")
    served = f"{procedure}@{n}"
    points = "\n".join(f"- {name}: KL {r['kl']:.3f}, W({served}) {r['win_rates'][served]['win_rate']:.3f}"
                       for name, r in rows.items())
    text = (f"Points:\n\n{points}\n\n" + "".join(f"Note: {n}.\n" for n in notes) + "\n"
            + matched_kl_differences_table(diffs))
    (args.out / "matched_kl_differences.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
