"""``iapo runs``: the run records under a folder as a table, or what differs between two runs.

It only reads ``manifest.json`` files (no JAX, no model) and writes no record of its own. The table
has one row per run: its folder, job, start date, status, the job's key settings, its headline
metrics and the git commit it ran at (``+`` marks uncommitted changes). ``--compare A B`` lists the
settings and final metrics that differ between two runs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import tyro

from iapo_jax.errors import IapoError
from iapo_jax.commands import JobSpec

MANIFEST = "manifest.json"  # as runtime.manifest.MANIFEST (not imported: that pulls in JAX)

# The settings worth a column, per job (others: the first few of the record's config).
KEY_SETTINGS = {
    "ctrl": ("model", "reward", "transform", "procedure", "deploy_n", "target_kl", "beta", "steps",
             "learning_rate"),
    "compare": ("model", "reward", "procedure", "deploy_n", "methods", "target_kl", "steps"),
    "quickstart": ("model", "reward", "procedure", "deploy_n", "methods", "target_kl", "steps"),
    "train-rm": ("model", "pairs", "scorer", "mode", "steps", "learning_rate"),
    "train-scorer": ("model", "reward", "method", "mode", "steps", "learning_rate"),
    "calibrate": ("model", "reward", "samples", "num_prompts", "max_new_tokens"),
    "generate": ("model", "mode", "n", "reward", "scorer"),
    "eval": ("policy", "reference", "samples", "procedures", "ns"),
    "theory": ("procedure", "n", "kl", "beta", "transform"),
    "testbed": ("cases", "transforms", "kls", "options"),
    "bench": ("target", "models", "dtypes", "modes"),
    "reproduce": ("source",),
    "env": ("steps", "lr", "data", "fsdp", "tensor"),
}
# Headline metrics (name patterns, in order), per job; others: the first few metrics.
HEADLINE_METRICS = {
    "ctrl": ("kl", "raw_reward", "probe_win_rate", "step_seconds"),
    # a beta sweep names its policies "ctrl@beta=0.31"; the first one stands for the sweep
    "compare": ("ctrl*.kl", "ctrl*.win_rate.{procedure}@{deploy_n}",
                "calibrated*.win_rate.{procedure}@{deploy_n}", "raw*.win_rate.{procedure}@{deploy_n}"),
    "quickstart": ("ctrl*.kl", "ctrl*.win_rate.{procedure}@{deploy_n}",
                   "calibrated*.win_rate.{procedure}@{deploy_n}"),
    "train-rm": ("eval_pairwise_accuracy", "eval_loss"),
    "train-scorer": ("*mse*", "*win_rate*"),
    "eval": ("*win_rate*", "kl*"),
    "testbed": ("runs_meeting_target", "runs", "max_abs_win_rate_error"),
    "bench": ("*tokens_per_s", "*step_s"),
    "reproduce": ("checks", "mismatches"),
    "env": ("final_loss", "weight_error"),
}
SHOWN = 3  # metrics (and fallback settings) per row


class RunsError(IapoError, ValueError):
    """The folder to list, or a run to compare, is not there."""


@dataclasses.dataclass(frozen=True)
class RunsConfig:
    """List the run records under a folder (job, date, status, key settings, headline metrics,
    git commit), or, with --compare A B, show the settings and metrics that differ."""

    dir: tyro.conf.Positional[Path] = Path("runs")
    """Folder to search (its subfolders too) for run records."""
    compare: Annotated[tuple[Path, Path] | None, tyro.conf.arg(metavar="RUN_A RUN_B")] = None
    """Two run directories: show the settings and final metrics that differ between them."""


def find_records(root: Path) -> tuple[list[tuple[Path, dict]], list[Path]]:
    """(run directory, record) under ``root`` oldest first, and the folders whose manifest.json
    could not be read. Checkpoint folders are not searched."""
    import json

    found, unreadable = [], []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "checkpoints" and not d.startswith("."))
        if MANIFEST not in files:
            continue
        try:
            with open(Path(folder) / MANIFEST, encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            unreadable.append(Path(folder))
            continue
        if isinstance(record, dict) and "job" in record:
            found.append((Path(folder), record))
        else:
            unreadable.append(Path(folder))
    found.sort(key=lambda item: str(item[1].get("started") or ""))
    return found, unreadable


def _value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, (list, tuple)):
        return ",".join(_value(v) for v in value)
    if isinstance(value, str) and ("/" in value or os.sep in value):
        return Path(value).name or value  # a model or run path: its last part says enough
    return str(value)


def key_settings(record: dict) -> str:
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    names = KEY_SETTINGS.get(record.get("job"), tuple(config)[:SHOWN])
    shown = [f"{n}={_value(config[n])}" for n in names
             if n in config and config[n] not in (None, (), [], "")]
    return " ".join(shown)


def headline_metrics(record: dict) -> str:
    metrics = record.get("metrics") or {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    patterns = HEADLINE_METRICS.get(record.get("job"), ())
    chosen: list[str] = []
    for pattern in patterns:
        try:
            pattern = pattern.format(**config)
        except (KeyError, IndexError, ValueError):
            continue
        chosen += [n for n in fnmatch.filter(metrics, pattern) if n not in chosen][:1]
    if not chosen:
        chosen = list(metrics)[:SHOWN]
    return " ".join(f"{n}={_value(metrics[n])}" for n in chosen[:SHOWN])


def commit(record: dict) -> str:
    git = ((record.get("code") or {}).get("git") or {})
    sha = git.get("commit")
    if not sha:
        return "-"
    return sha[:10] + ("+" if git.get("dirty") else "")


def date(record: dict) -> str:
    started = str(record.get("started") or "")
    return started[:16].replace("T", " ") if started else "-"


def table_rows(root: Path, found: list[tuple[Path, dict]]) -> list[dict[str, str]]:
    rows = []
    for folder, record in found:
        name = str(folder.relative_to(root)) if folder != root else str(folder)
        rows.append({"run": name, "job": str(record.get("job")), "date": date(record),
                     "status": str(record.get("status")), "settings": key_settings(record),
                     "metrics": headline_metrics(record), "commit": commit(record)})
    return rows


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flat(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def differences(a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    """(settings rows, metric rows) where runs ``a`` and ``b`` differ."""
    config_a, config_b = _flat(a.get("config") or {}), _flat(b.get("config") or {})
    settings = [{"setting": "job", "A": a.get("job"), "B": b.get("job")}] if a.get("job") != b.get(
        "job") else []
    if commit(a) != commit(b):
        settings.append({"setting": "commit", "A": commit(a), "B": commit(b)})
    for key in sorted(set(config_a) | set(config_b)):
        if config_a.get(key, "-") != config_b.get(key, "-"):
            settings.append({"setting": key, "A": _value(config_a.get(key, "-")),
                             "B": _value(config_b.get(key, "-"))})
    metrics_a, metrics_b = a.get("metrics") or {}, b.get("metrics") or {}
    metrics = []
    for key in list(metrics_a) + [k for k in metrics_b if k not in metrics_a]:
        va, vb = metrics_a.get(key), metrics_b.get(key)
        if va == vb:
            continue
        both = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        metrics.append({"metric": key, "A": "-" if va is None else _value(va),
                        "B": "-" if vb is None else _value(vb),
                        "B - A": _value(vb - va) if both else ""})
    return settings, metrics


def _load(path: Path) -> dict:
    from iapo_jax.runtime.manifest import load_record

    return load_record(path)


def compare_runs(a_dir: Path, b_dir: Path) -> str:
    from iapo_jax.runtime.progress import format_table

    a, b = _load(a_dir), _load(b_dir)
    lines = [f"A: {a_dir}  ({a.get('job')}, {date(a)}, {a.get('status')}, commit {commit(a)})",
             f"B: {b_dir}  ({b.get('job')}, {date(b)}, {b.get('status')}, commit {commit(b)})", ""]
    settings, metrics = differences(a, b)
    lines.append(format_table(settings, ["setting", "A", "B"]) if settings
                 else "settings: the same")
    lines.append("")
    lines.append(format_table(metrics, ["metric", "A", "B", "B - A"]) if metrics
                 else "final metrics: the same")
    return "\n".join(lines)


def run(cfg: RunsConfig) -> int:
    from iapo_jax.runtime.progress import format_table

    if cfg.compare is not None:
        print(compare_runs(*cfg.compare))
        return 0
    root = cfg.dir
    if not root.is_dir():
        raise RunsError(f"{root} is not a folder; pass the folder that holds your runs "
                        "(default: runs/)")
    found, unreadable = find_records(root)
    if not found:
        print(f"iapo runs: no run records under {root}", file=sys.stderr)
    else:
        print(format_table(table_rows(root, found),
                           ["run", "job", "date", "status", "settings", "metrics", "commit"]))
    if unreadable:
        names = ", ".join(str(p) for p in unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
        print(f"iapo runs: {len(unreadable)} folder(s) with an unreadable manifest.json skipped "
              f"({names})", file=sys.stderr)
    return 0


JOB = JobSpec(config=RunsConfig, run=run, recordless=True, single_process=True)  # reads records, writes none
