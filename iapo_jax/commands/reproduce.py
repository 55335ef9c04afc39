"""``iapo reproduce RUN_DIR``: rerun a recorded job with its recorded config and compare the numbers.

The rerun goes into a new run directory. First the fingerprints of what the run read (model
weights, reward or scorer, pools, prompts) must be the same: a rerun from other inputs proves
nothing. Then every final metric of the record, and every logged series in metrics.jsonl, is
compared, and the fingerprints of what the run wrote (samples, exported policy, pools): numbers
exactly when the machine type (backend, device kind, CPU model), device and process counts and JAX
version are the same as recorded, else within ``rtol``; output fingerprints only on the same
machine type (elsewhere the last bits of a float may differ). Any difference makes the command exit
with status 3, naming the first one (and, for a run with steps, the first step that diverges).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
from pathlib import Path
from typing import Any

import tyro

from iapo_jax.errors import IapoError
from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import run_job
from iapo_jax.commands.configs import ConfigError, config_from_mapping, recorded_config



class ReproduceMismatch(Exception):
    """The rerun's numbers differ from the record (the CLI exits with status 3)."""


class NotReproducibleError(IapoError, ValueError):
    """The record cannot be rerun (unfinished run, unknown job, config no longer valid)."""


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """Rerun a recorded run into a new run directory and compare its metrics one by one."""

    source: tyro.conf.Positional[Path]
    """Run directory to reproduce (it holds manifest.json)."""
    rtol: float = 1e-4
    """Relative tolerance used when the machine type or device count differs from the record
    (on the same machine type and device count the numbers must match exactly)."""
    atol: float = 1e-9
    """Absolute tolerance added to rtol for values near zero (also only across machines)."""
    ignore: tuple[str, ...] = ()
    """Metric-name patterns (fnmatch, e.g. '*_seconds') not to compare, on top of the job's own
    reproduce_ignore (timings and other numbers that vary between runs)."""


@dataclasses.dataclass(frozen=True)
class Check:
    name: str  # as shown in the table
    recorded: Any
    rerun: Any
    rel_diff: float | None
    ok: bool
    note: str = ""
    metric: str = ""  # the bare metric name (for ignore patterns); defaults to ``name``

    def __post_init__(self):
        if not self.metric:
            object.__setattr__(self, "metric", self.name)


def _rel_diff(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 and math.isfinite(scale) else math.inf


def _check(name: str, old: Any, new: Any, rtol: float, atol: float) -> Check:
    from iapo_jax.runtime.jsonable import same_number

    if old is None or new is None:
        side = "record" if old is None else "rerun"
        return Check(name, old, new, None, False, f"missing in {side}")
    ok = same_number(new, old, rtol, atol)
    return Check(name, old, new, _rel_diff(float(old), float(new)), ok)


def compare_metrics(old: dict, new: dict, rtol: float = 0.0, atol: float = 0.0) -> list[Check]:
    """Final metrics, name by name (a name present on one side only is a mismatch)."""
    return [_check(k, old.get(k), new.get(k), rtol, atol) for k in sorted(set(old) | set(new))]


def _series(rows: list[dict]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            series.setdefault(key, {})[int(row.get("step", -1))] = value
    return series


def compare_series(old_rows: list[dict], new_rows: list[dict], rtol: float = 0.0,
                   atol: float = 0.0) -> list[Check]:
    """Logged step metrics: one check per metric name, reporting its worst step."""
    old, new = _series(old_rows), _series(new_rows)
    checks = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, {}), new.get(name, {})
        label = f"{name} (series, {len(a)} steps)"
        if set(a) != set(b):
            checks.append(Check(label, len(a), len(b), None, False, "logged steps differ", name))
            continue
        per_step = [_check(name, a[s], b[s], rtol, atol) for s in sorted(a)]
        worst = max(per_step, key=lambda c: (not c.ok, c.rel_diff or 0.0))
        step = sorted(a)[per_step.index(worst)]
        checks.append(Check(label, worst.recorded, worst.rerun, worst.rel_diff,
                            all(c.ok for c in per_step), f"worst at step {step}", name))
    return checks


def first_diverging_step(old_rows: list[dict], new_rows: list[dict], rtol: float = 0.0,
                         atol: float = 0.0) -> tuple[int, str] | None:
    """(step, metric) of the earliest logged step at which the rerun differs, or None."""
    from iapo_jax.runtime.jsonable import same_number

    old, new = _series(old_rows), _series(new_rows)
    first = None
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, {}), new.get(name, {})
        for step in sorted(set(a) | set(b)):
            if step in a and step in b and same_number(b[step], a[step], rtol, atol):
                continue
            if first is None or step < first[0]:
                first = (step, name)
            break
    return first


def _inside(path: str | None, folder: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def compare_fingerprints(old: dict, new: dict, source: Path, rerun_dir: Path, *,
                         outputs: bool) -> list[Check]:
    """Inputs (model weights, reward, pools, prompts: record "fingerprints" with role input and
    "data") always; outputs only when ``outputs``. Entries of "data" that are files the run wrote
    into its own folder are skipped: their bytes (an .npz's timestamps) are not its content."""
    checks = []
    old_fp, new_fp = old.get("fingerprints") or {}, new.get("fingerprints") or {}
    for name in sorted(set(old_fp) | set(new_fp), key=lambda n: (
            (old_fp.get(n) or new_fp.get(n)).get("role") != "input", n)):
        a, b = old_fp.get(name), new_fp.get(name)
        role = (a or b).get("role", "input")
        if role == "output" and not outputs:
            continue
        checks.append(_fingerprint_check(f"fingerprint {name} ({role})", a, b, name))
    for name in sorted(set(old.get("data") or {}) | set(new.get("data") or {})):
        a, b = (old.get("data") or {}).get(name), (new.get("data") or {}).get(name)
        if _inside((a or {}).get("path"), source) or _inside((b or {}).get("path"), rerun_dir):
            continue
        checks.append(_fingerprint_check(f"data {name}", a, b, name))
    return checks


def _fingerprint_check(label: str, a: dict | None, b: dict | None, name: str) -> Check:
    short = lambda entry: None if entry is None else str(entry.get("sha256"))[:12]  # noqa: E731
    if a is None or b is None:
        return Check(label, short(a), short(b), None, False,
                     f"missing in {'record' if a is None else 'rerun'}", name)
    ok = a.get("sha256") == b.get("sha256")
    where = a.get("source") or a.get("path") or a.get("reward")
    note = "" if ok else (f"content differs from the record's ({where} changed?)" if where
                          else "content differs")
    return Check(label, short(a), short(b), None, ok, note, name)


def _code_notes(old: dict, new: dict) -> list[str]:
    notes = []
    old_code, new_code = old.get("code") or {}, new.get("code") or {}
    if old_code.get("source_sha256") != new_code.get("source_sha256"):
        notes.append("the package source differs from the recorded run's")
    old_git, new_git = old_code.get("git") or {}, new_code.get("git") or {}
    if old_git.get("commit") != new_git.get("commit"):
        notes.append(f"git commit {old_git.get('commit')} was recorded, now {new_git.get('commit')}")
    if old.get("packages") != new.get("packages"):
        changed = sorted(k for k in set(old.get("packages") or {}) | set(new.get("packages") or {})
                         if (old.get("packages") or {}).get(k) != (new.get("packages") or {}).get(k))
        notes.append(f"package versions differ: {', '.join(changed[:8])}")
    return notes


def run(cfg: ReproduceConfig, run_dir: Path | None = None) -> dict:
    """Rerun ``cfg.source`` into ``run_dir`` (default: a new folder under runs/) and compare."""
    from iapo_jax.commands import UnknownJobError, load_job
    from iapo_jax.runtime.environment import machine_signature
    from iapo_jax.runtime.manifest import load_record
    from iapo_jax.runtime.metrics import read_metrics
    from iapo_jax.runtime.progress import print_table

    if cfg.rtol < 0 or cfg.atol < 0:
        raise ValueError("rtol and atol must be >= 0")
    old = load_record(cfg.source)
    if old.get("status") != "ok":
        raise NotReproducibleError(
            f"{cfg.source} records a run with status {old.get('status')!r}; only finished runs "
            "(status 'ok') can be reproduced"
        )
    if old["job"] == "reproduce":
        raise NotReproducibleError("a reproduce record has nothing to rerun; pass the original run")
    try:
        job = load_job(old["job"])
        config = config_from_mapping(job.config_type, recorded_config(job.spec, old.get("config")))
    except (UnknownJobError, ConfigError) as err:
        raise NotReproducibleError(f"cannot rerun {cfg.source}: {err}") from None

    ctx = run_job(job, config, run_dir=run_dir, extra={"reproduces": str(cfg.source)})
    new = ctx.record.data

    same = machine_signature(old) == machine_signature(new)
    rtol, atol = (0.0, 0.0) if same else (cfg.rtol, cfg.atol)
    notes = []
    if "fingerprints" in old:
        fingerprints = compare_fingerprints(old, new, cfg.source, ctx.run_dir, outputs=same)
        if not same:
            notes.append("outputs are compared by their numbers only: their fingerprints need the "
                         "same machine type")
    else:
        fingerprints = []
        notes.append("the record has no fingerprints (an older version wrote it): only numbers "
                     "are compared")
    inputs = [c for c in fingerprints if not c.name.endswith("(output)")]
    outputs = [c for c in fingerprints if c.name.endswith("(output)")]
    old_rows, new_rows = read_metrics(cfg.source), read_metrics(ctx.run_dir)
    checks = inputs + compare_metrics(old.get("metrics") or {}, new.get("metrics") or {}, rtol, atol)
    checks += compare_series(old_rows, new_rows, rtol, atol) + outputs
    patterns = tuple(cfg.ignore) + tuple(job.spec.reproduce_ignore)
    checks = [c for c in checks if c.name.startswith(("fingerprint ", "data "))
              or not any(fnmatch.fnmatchcase(c.metric, p) for p in patterns)]
    failed = [c for c in checks if not c.ok]
    ignored = lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731
    diverged = first_diverging_step([{k: v for k, v in r.items() if not ignored(k)}
                                     for r in old_rows],
                                    [{k: v for k, v in r.items() if not ignored(k)}
                                     for r in new_rows], rtol, atol)

    rule = "exact (same machine type and device count)" if same else (
        f"within rtol={cfg.rtol:g}, atol={cfg.atol:g} (machine differs: recorded "
        f"{machine_signature(old)}, now {machine_signature(new)})")
    ctx.record.set_extra("reproduction", {
        "source": str(cfg.source), "rule": rule, "checks": len(checks), "mismatches": len(failed),
        "failed": [c.name for c in failed],
        "first_diverging_step": None if diverged is None else {"step": diverged[0],
                                                                "metric": diverged[1]},
    })
    ctx.record.write()

    if ctx.is_main:
        print_table(
            [{"metric": c.name, "recorded": c.recorded, "rerun": c.rerun,
              "rel. diff": "" if c.rel_diff is None else f"{c.rel_diff:.2e}",
              "result": ("match" if c.ok else "MISMATCH") + (f" ({c.note})" if c.note else "")}
             for c in checks],
            title=f"reproduce {cfg.source} -> {ctx.run_dir}: comparing {rule}",
        )
        for note in notes + _code_notes(old, new):
            print(f"note: {note}", file=sys.stderr)
    if not checks:
        print("note: the record has no metrics to compare", file=sys.stderr)
    if failed:
        first = failed[0]
        detail = first.note or f"recorded {first.recorded}, rerun {first.rerun}"
        step = "" if diverged is None else f"; the rerun diverges at step {diverged[0]} ({diverged[1]})"
        raise ReproduceMismatch(
            f"{len(failed)} of {len(checks)} checks differ from {cfg.source}; first: {first.name}: "
            f"{detail}{step}; the rerun is in {ctx.run_dir}"
        )
    return {"checks": len(checks), "mismatches": 0, "run_dir": str(ctx.run_dir)}


JOB = JobSpec(config=ReproduceConfig, run=run, manages_run_dir=True)  # run(cfg, run_dir=...) records itself
