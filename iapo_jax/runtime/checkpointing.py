"""Checkpoints that survive preemption: a thin layer over ``orbax.checkpoint.CheckpointManager``.

Each step directory holds three items: ``model`` (an nnx.State or any pytree of arrays),
``opt_state`` (optional) and ``meta`` (JSON: step, PRNG key data, data-iterator position, config).
Saves are asynchronous; the last ``keep_last`` steps and the ``keep_best`` best by ``best_metric``
are kept. Restores go onto the shardings of the target you pass, so a checkpoint written on one
mesh restores onto another. A latest checkpoint that cannot be read (partial, truncated, corrupt)
is skipped with a ``CheckpointFallbackWarning`` and the previous one is used; a checkpoint whose
arrays do not match the target (another model config) raises ``IncompatibleCheckpointError``.

Typical training loop (all processes run it)::

    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=3, best_metric="reward", save_every=50)
    start = 0
    if resume:
        r = ckpt.restore(model=abstract_params(state, mesh), opt_state=abstract_opt)
        state, opt_state, key, start = r.model, r.opt_state, r.rng, r.step + 1
        loader.set_position(r.data_position)
    for step in range(start, steps):
        ...
        ckpt.maybe_save(step, model=state, opt_state=opt_state, rng=key,
                        data_position=loader.position(), config=cfg, metrics={"reward": r})
        if ckpt.should_stop:   # SIGTERM arrived: the final checkpoint is written, leave cleanly
            break
    ckpt.close()
"""

from __future__ import annotations

import base64
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from iapo_jax.errors import IapoError
from iapo_jax.runtime import signals
from iapo_jax.runtime.jsonable import scalar_or_none, to_jsonable

MODEL, OPT_STATE, META = "model", "opt_state", "meta"


class IncompatibleCheckpointError(IapoError, ValueError):
    """The checkpoint's arrays do not match the restore target (a different model config)."""


class NoCheckpointError(IapoError, FileNotFoundError):
    """No (readable) checkpoint exists where one was asked for."""


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint could not be read and an older one is used instead."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    model: Any
    opt_state: Any | None
    rng: jax.Array | None
    data_position: Any
    config: dict | None
    meta: dict  # the whole JSON item, for anything a trainer stored via ``extra``


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _host_array(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data  # keys are replicated: any shard is the whole value
    return np.asarray(jax.device_get(x))


def encode_key(key: jax.Array | None) -> dict | None:
    """PRNG key -> JSON (typed keys keep their implementation name)."""
    if key is None:
        return None
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = _host_array(jax.random.key_data(key) if typed else key)
    return {
        "typed": bool(typed),
        "impl": str(jax.random.key_impl(key)) if typed else None,
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "data": data.ravel().tolist(),
    }


def decode_key(blob: dict | None) -> jax.Array | None:
    if blob is None:
        return None
    data = np.asarray(blob["data"], dtype=blob["dtype"]).reshape(blob["shape"])
    if blob["typed"]:
        return jax.random.wrap_key_data(jnp.asarray(data), impl=blob["impl"])
    return jnp.asarray(data)


def _encode_position(position: Any) -> Any:
    if isinstance(position, bytes):  # e.g. grain's iterator.get_state()
        return {"__bytes_b64__": base64.b64encode(position).decode("ascii")}
    return to_jsonable(position)


def _decode_position(blob: Any) -> Any:
    if isinstance(blob, dict) and set(blob) == {"__bytes_b64__"}:
        return base64.b64decode(blob["__bytes_b64__"])
    return blob


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """path -> shape for every array-like leaf; Variables' ".value" level is dropped from paths."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, (dict, list, tuple))
    )[0]
    out = {}
    for path, leaf in leaves:
        if not hasattr(leaf, "shape"):
            continue
        names = [_key_name(p) for p in path]
        if names and names[-1] == "value":
            names = names[:-1]
        out["/".join(names)] = tuple(leaf.shape)
    return out


def _compare(item: str, saved: dict, wanted: dict) -> list[str]:
    problems = []
    for path in sorted(set(wanted) - set(saved))[:3]:
        problems.append(f"{item}/{path} is missing from the checkpoint")
    for path in sorted(set(saved) - set(wanted))[:3]:
        problems.append(f"{item}/{path} is in the checkpoint but not in the target")
    for path in sorted(set(saved) & set(wanted)):
        if saved[path] != wanted[path] and len(problems) < 6:
            problems.append(f"{item}/{path} has shape {saved[path]} in the checkpoint, "
                            f"{wanted[path]} in the target")
    return problems


def unreadable_reason(err: BaseException) -> str:
    """A short, readable cause for a checkpoint that cannot be read (orbax and TensorStore errors
    carry pages of internal detail; the user needs to know only what kind of damage it is)."""
    text = str(err)
    lowered = text.lower()
    if isinstance(err, json.JSONDecodeError) or "json" in lowered and "decode" in lowered:
        return "its metadata is not valid JSON"
    if isinstance(err, FileNotFoundError) or "not found" in lowered or "no such file" in lowered \
            or "does not exist" in lowered or "missing" in lowered:
        return "some of its files are missing"
    if "tensorstore" in lowered or "out_of_range" in lowered or "data_loss" in lowered \
            or "truncat" in lowered or "corrupt" in lowered:
        return "its array data is truncated or corrupt"
    first = " ".join(text.split())[:120]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class Checkpointer:
    """Save and restore training state in ``directory``; see the module docstring.

    Args:
      directory: where step folders go (created if missing).
      keep_last: how many of the most recent checkpoints to keep.
      best_metric: name of a metric passed to ``save``; the ``keep_best`` best are also kept.
      best_mode: "max" or "min" for ``best_metric``.
      save_every: ``maybe_save`` saves when ``step % save_every == 0`` (and on preemption).
      async_save: write in the background; ``wait()``/``close()``/``restore`` wait for it.
      handle_sigterm: on SIGTERM, ask for a final save instead of dying (single process; with
        several processes JAX's preemption sync point decides, so all processes save the same step).
      on_save: called with the step once its save is complete on disk (at the next save, ``wait``
        or ``close``), e.g. ``RunRecord.add_checkpoint``: a record never lists a step that a kill
        during its save left unfinished.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        save_every: int = 1,
        async_save: bool = True,
        handle_sigterm: bool = True,
        on_save: Callable[[int], None] | None = None,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1 (resuming needs the latest)")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode={best_mode!r} must be 'max' or 'min'")
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1")
        if best_metric is not None and keep_best < 1:
            raise ValueError(f"keep_best={keep_best} must be >= 1 when best_metric is set")
        ocp = _ocp()
        cm = ocp.checkpoint_managers
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self._on_save = on_save
        self._pending: int | None = None  # saved asynchronously, not yet reported to on_save
        policies = [cm.LatestN(n=keep_last)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(cm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                     n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            preservation_policy=cm.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        _remove_unfinished_saves(self.directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                MODEL: ocp.StandardCheckpointHandler(),
                OPT_STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )
        self._stopping = False
        # The process-wide handler (runtime.signals): the first SIGTERM sets a flag this loop reads.
        self._handles_sigterm = signals.install() if handle_sigterm else False
        if self._handles_sigterm:
            signals.defer(True)

    # -- preemption -----------------------------------------------------------------------------
    def preemption_requested(self, step: int) -> bool:
        """True once a SIGTERM arrived (or, with several processes, at JAX's preemption sync point)."""
        if jax.process_count() > 1:
            return bool(self._manager.reached_preemption(step))
        return bool(self._handles_sigterm) and signals.requested()

    @property
    def should_stop(self) -> bool:
        """True after ``maybe_save`` wrote the checkpoint a preemption asked for: leave the loop."""
        return self._stopping

    # -- saving ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: Any,
        opt_state: Any = None,
        rng: jax.Array | None = None,
        data_position: Any = None,
        config: Any = None,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        force: bool = True,
    ) -> bool:
        """Save now (asynchronously). Returns whether a checkpoint was started."""
        numbers = {}
        for name, value in (metrics or {}).items():
            number = scalar_or_none(value)
            if number is None:
                raise ValueError(f"checkpoint metric {name!r} must be a scalar number")
            numbers[name] = float(number)
        if self.best_metric is not None and self.best_metric not in numbers:
            raise ValueError(
                f"this Checkpointer keeps the best by {self.best_metric!r}; pass "
                f"metrics={{{self.best_metric!r}: value}} to save()"
            )
        meta = {
            "step": int(step),
            "rng": encode_key(rng),
            "data_position": _encode_position(data_position),
            "config": to_jsonable(config),
            "extra": to_jsonable(dict(extra or {})),
        }
        ocp = _ocp()
        items = {MODEL: ocp.args.StandardSave(model), META: ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items[OPT_STATE] = ocp.args.StandardSave(opt_state)
        self._report_finished()
        saved = self._manager.save(
            int(step), args=ocp.args.Composite(**items), metrics=numbers or None, force=force
        )
        if saved:
            self._pending = int(step)
        return bool(saved)

    def _report_finished(self) -> None:
        """Wait for the save in flight, then tell on_save its step is on disk."""
        if self._pending is None:
            return
        self._manager.wait_until_finished()
        step, self._pending = self._pending, None
        if self._on_save is not None:
            self._on_save(step)

    def maybe_save(self, step: int, **items: Any) -> bool:
        """Save when ``step`` is on the ``save_every`` grid or a preemption was requested.

        After a preemption save, ``should_stop`` becomes True. Takes the same items as ``save``.
        """
        if self.preemption_requested(step):
            with signals.shield():  # a second notice must not cut the final save short
                if self._manager.latest_step() != int(step):
                    self.save(step, **items, force=True)
                self.wait()  # the process is about to exit: the checkpoint must be complete
            self._stopping = True
            return True
        if self._manager.should_save(int(step)):
            return self.save(step, **items, force=True)
        return False

    # -- restoring ------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (the latest when no metric is tracked)."""
        self._manager.reload()
        return self._manager.best_step()

    def _check_compatible(self, step: int, model: Any, opt_state: Any) -> None:
        metadata = self._manager.item_metadata(step)  # raises for an unreadable checkpoint
        problems = []
        for item, target in ((MODEL, model), (OPT_STATE, opt_state)):
            if target is None:
                continue
            saved = metadata.get(item) if hasattr(metadata, "get") else metadata[item]
            if saved is None:
                if item == OPT_STATE:
                    raise IncompatibleCheckpointError(
                        f"checkpoint step {step} in {self.directory} has no optimizer state; "
                        "restore with opt_state=None"
                    )
                raise FileNotFoundError(f"item {item!r} is missing")
            tree = getattr(saved, "tree", saved)
            problems += _compare(item, _shapes(tree), _shapes(target))
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this model: "
                + "; ".join(problems)
                + ". Restore with the config the checkpoint was saved with (see its run record), "
                "or start a new run directory"
            )

    def restore(self, *, model: Any, opt_state: Any = None, step: int | None = None) -> Restored:
        """Restore ``step`` (default: the latest readable one) onto the given targets.

        ``model`` / ``opt_state`` are trees like the saved ones whose leaves are arrays or
        ``jax.ShapeDtypeStruct`` with a ``sharding`` (see ``parallel.mesh.abstract_params``);
        the restored arrays get those shardings. With ``step=None`` an unreadable latest checkpoint
        is skipped with a CheckpointFallbackWarning.
        """
        self.wait()
        candidates = [int(step)] if step is not None else self.all_steps()[::-1]
        if not candidates:
            raise NoCheckpointError(
                f"no checkpoint in {self.directory}; run without --resume to start fresh"
            )
        ocp = _ocp()
        failures = []
        for candidate in candidates:
            try:
                self._check_compatible(candidate, model, opt_state)
                items = {MODEL: ocp.args.StandardRestore(model), META: ocp.args.JsonRestore()}
                if opt_state is not None:
                    items[OPT_STATE] = ocp.args.StandardRestore(opt_state)
                restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
            except IncompatibleCheckpointError:
                raise
            except Exception as err:  # anything unreadable: partial, truncated, corrupt
                reason = unreadable_reason(err)
                if step is not None:
                    raise NoCheckpointError(
                        f"checkpoint step {step} in {self.directory} is unreadable ({reason}); "
                        "restore another step or the latest (step=None)"
                    ) from err
                failures.append(candidate)
                older = [c for c in candidates if c < candidate]
                warnings.warn(
                    f"checkpoint step {candidate} in {self.directory} is unreadable ({reason}); "
                    + (f"falling back to step {older[0]}" if older else "no older checkpoint"),
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
                continue
            meta = restored[META] or {}
            return Restored(
                step=candidate,
                model=restored[MODEL],
                opt_state=restored[OPT_STATE] if opt_state is not None else None,
                rng=decode_key(meta.get("rng")),
                data_position=_decode_position(meta.get("data_position")),
                config=meta.get("config"),
                meta=meta,
            )
        steps = ", ".join(str(c) for c in failures)
        raise NoCheckpointError(
            f"every checkpoint in {self.directory} is unreadable (steps {steps}); nothing can be "
            "resumed: start over in a new --run-dir without --resume (or delete that checkpoints "
            "folder and rerun)"
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()
        self._report_finished()

    def close(self) -> None:
        """Finish pending saves, release orbax resources and give back the SIGTERM handler."""
        self._manager.wait_until_finished()
        self._report_finished()
        self._manager.close()
        if self._handles_sigterm:
            signals.defer(False)
            signals.uninstall()
            self._handles_sigterm = False

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_unfinished_saves(directory) -> None:
    """Delete the temporary folders a killed save left behind, before orbax opens the directory.

    orbax also removes them, but in a background thread: two checkpointers opened one after the
    other on the same directory (a check, then the resume) then delete the same tree at once and
    one of them fails. Removing them here, synchronously and on process 0 only, leaves orbax none.
    """
    import shutil

    path = Path(directory)
    if jax.process_index() != 0 or not path.is_dir():
        return
    for leftover in path.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)

