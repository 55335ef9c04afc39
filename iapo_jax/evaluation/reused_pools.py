"""A comparison that reuses an earlier comparison's calibration and evaluation pools.

Adding methods to a finished comparison (raw and bon-distill next to CTRL and calibrated RLHF)
should not resample the reference: the pools of a 64-prompt run take a quarter of an hour on a
CPU, and reusing them makes the two runs share their reference samples exactly, so the methods of
both are paired (experiments/ctrl/join_runs.py). The earlier run must have sampled its pools as
this run would: the same model, dtype, reward, prompts, pool sizes, response length and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from iapo_jax.rewards.calibration import ReferencePool

# The comparison settings that decide what the pools hold (CompareConfig field names).
POOL_SETTINGS = ("model", "dtype", "reward", "train_prompts", "eval_prompts", "pool_size", "eval_samples",
                 "max_new_tokens", "seed")
POOL_DIRS = ("pool_train", "pool_eval")


def check_pools_from(cfg) -> None:
    """ValueError naming the problem and the fix when cfg.pools_from cannot stand in for sampling."""
    if cfg.pools_from is None:
        return
    run = Path(cfg.pools_from)
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"pools_from {run}: no manifest.json there; pass the run directory of an earlier "
                         "`iapo compare` (it holds pool_train/ and pool_eval/)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("job") not in (None, "compare", "quickstart"):
        raise ValueError(f"pools_from {run} is a {manifest['job']!r} run; pass an `iapo compare` run directory")
    theirs = manifest.get("config", {})
    differ = [k for k in POOL_SETTINGS if k in theirs and theirs[k] != getattr(cfg, k)]
    if differ:
        pairs = ", ".join(f"{k} {theirs[k]!r} there, {getattr(cfg, k)!r} here" for k in differ)
        raise ValueError(f"pools_from {run} sampled its pools with other settings ({pairs}); use that run's "
                         "values, or drop pools_from to sample new pools")
    for name in POOL_DIRS:
        if not (run / name).is_dir():
            raise ValueError(f"pools_from {run} has no {name}/ folder (the run failed or was cut short before "
                             "calibration ended); drop pools_from to sample new pools")


def load_pools_from(cfg, train: list[str], held_out: list[str]) -> tuple[ReferencePool, ReferencePool]:
    """The earlier run's (calibration pool, evaluation pool), checked against this run's prompts."""
    run = Path(cfg.pools_from)
    pools = tuple(ReferencePool.load(run / name) for name in POOL_DIRS)  # load checks each pool's integrity
    for pool, prompts, name in zip(pools, (train, held_out), POOL_DIRS):
        if tuple(pool.prompts) != tuple(prompts):
            raise ValueError(f"pools_from {run}: {name} holds other prompts than this run draws; its prompt "
                             "data changed since. Drop pools_from to sample new pools")
    return pools
