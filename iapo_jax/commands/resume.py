"""``--resume``: continue the run recorded in ``--run-dir``, with the config from its record.

Only jobs that checkpoint (``JobSpec.resumable``) resume. The record's config is the starting
point; flags given with ``--resume`` may change only the keys the job lists in
``JobSpec.resume_safe`` (``steps`` may only grow), because anything else would make the continued run a
different run. ``--allow-changes`` lets other changes through on purpose; the record then lists
them under ``extra.allowed_changes`` (with the checkpoint they started from), since the continued
run is no longer the one that was started. Every check here reads the record only, so a refusal
costs no model load and leaves the record byte for byte as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iapo_jax.errors import IapoError


class ResumeError(IapoError, ValueError):
    """The run cannot be resumed as asked (another job, changed settings, not a run)."""


def safe_keys(spec: Any, recorded: dict | None = None) -> tuple[str, ...]:
    """Keys a resume may change (a JobSpec's resume_safe, narrowed by its narrow_resume_safe of the
    recorded config where it has one)."""
    if spec.narrow_resume_safe is not None and recorded is not None:
        return tuple(spec.narrow_resume_safe(recorded))
    return tuple(spec.resume_safe)


def load_previous(job: str, run_dir: Path | None) -> dict:
    """The record a resume continues; ResumeError / MissingRecordError say what to pass instead."""
    from iapo_jax.runtime.manifest import load_record

    if run_dir is None:
        raise ResumeError("--resume needs --run-dir PATH naming the run to continue")
    record = load_record(run_dir)
    if record.get("job") != job:
        raise ResumeError(f"{run_dir} holds a {record.get('job')!r} run, not {job!r}; resume it "
                          f"with `iapo {record.get('job')} --run-dir {run_dir} --resume`")
    if not isinstance(record.get("config"), dict):
        raise ResumeError(f"{run_dir}/manifest.json records no config, so the run cannot be "
                          "continued; start a new run in a new --run-dir")
    return record


def _flat(config: Any) -> dict[str, Any]:
    from iapo_jax.runtime.jsonable import to_jsonable

    value = to_jsonable(config)
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}

    def walk(prefix: str, item: Any) -> None:
        if isinstance(item, dict):
            for key, sub in item.items():
                walk(f"{prefix}{key}.", sub)
        else:
            out[prefix[:-1]] = item

    walk("", value)
    return out


def changed_keys(recorded: Any, config: Any) -> dict[str, tuple[Any, Any]]:
    """key -> (recorded value, new value) for every setting that differs."""
    old, new = _flat(recorded), _flat(config)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def check_changes(spec: Any, job: str, recorded: Any, config: Any, *, allow: bool = False
                  ) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that changes anything but the job's safe keys (unless ``allow``, from
    --allow-changes); returns the changes."""
    changes = changed_keys(recorded, config)
    refused = unsafe_changes(spec, recorded, changes)
    if refused and not allow:
        safe = safe_keys(spec, recorded if isinstance(recorded, dict) else None)
        listed = "; ".join(f"--{k.replace('_', '-')} recorded {old!r}, now {new!r}"
                           for k, (old, new) in refused.items())
        allowed = (f" (only {', '.join('--' + k.replace('_', '-') for k in safe)} may change)"
                   if safe else "")
        raise ResumeError(f"--resume continues the recorded run, but these settings differ: "
                          f"{listed}; drop those flags to continue it{allowed}, add "
                          "--allow-changes to continue with them anyway, or start a new run in a "
                          "new --run-dir")
    if "steps" in changes:
        old, new = changes["steps"]
        if isinstance(old, int) and isinstance(new, int) and new < old:
            raise ResumeError(f"--steps {new} is below the {old} steps the run was set to; "
                              f"--steps can only grow on --resume (pass --steps {old} or more)")
    return changes


def unsafe_changes(spec: Any, recorded: Any, changes: dict[str, tuple[Any, Any]]
                   ) -> dict[str, tuple[Any, Any]]:
    """The changes outside the job's safe keys (those that make the continued run another run)."""
    safe = safe_keys(spec, recorded if isinstance(recorded, dict) else None)
    return {k: v for k, v in changes.items() if k not in safe}


ALLOWED_CHANGES = "allowed_changes"  # the record's extra: what --allow-changes let through


def allowed_changes_extra(spec: Any, record: dict, changes: dict[str, tuple[Any, Any]]
                          ) -> dict[str, Any]:
    """The record's note of the changes --allow-changes let through, this attempt's added to
    earlier ones, so the record says the run is not the one that was started."""
    earlier = list((record.get("extra") or {}).get(ALLOWED_CHANGES, []))
    unsafe = unsafe_changes(spec, record.get("config"), changes)
    if not unsafe:
        return {ALLOWED_CHANGES: earlier} if earlier else {}
    step = max(record.get("checkpoints") or [0])
    earlier.append({"from_checkpoint": step,
                    "changes": {k: {"recorded": old, "now": new} for k, (old, new) in unsafe.items()}})
    return {ALLOWED_CHANGES: earlier}


def nothing_to_do(record: dict, changes: dict) -> bool:
    """A finished run resumed with its own settings: rerunning would only rewrite the same state."""
    return record.get("status") == "ok" and not changes


def noop_message(job: str, run_dir: Path, record: dict, spec: Any) -> str:
    steps = (record.get("config") or {}).get("steps")
    more = (f"; pass --steps above {steps} to train on"
            if "steps" in safe_keys(spec, record.get("config") or {})
            and isinstance(steps, int) else "")
    return (f"iapo {job}: {run_dir} already finished"
            + (f" all {steps} steps" if isinstance(steps, int) else "")
            + f" with these settings; nothing to do, the record is unchanged{more}")

