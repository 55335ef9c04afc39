"""Step metrics as JSON lines (``metrics.jsonl``) and TensorBoard scalars, written by process 0 only.

Each line is ``{"step": 12, "time": 1732780000.1, "loss": 0.53, ...}``; the file is flushed after
every line so a killed run keeps everything logged so far. ``read_metrics`` reads it back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from iapo_jax.runtime.jsonable import scalar_or_none

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _import_summary_writer():
    # tensorboardX imports PyTorch, when installed, only to accept torch tensors (about 2 s here).
    # We log Python floats, so hide torch during that import unless something already loaded it.
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Append scalar metrics per step. On processes other than 0 every call is a no-op.

    Args:
      run_dir: the run directory; writes ``metrics.jsonl`` and ``tensorboard/`` inside it.
      tensorboard: also write TensorBoard event files (tensorboardX).
      enabled: force writing on or off; default: only on JAX process 0.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True,
                 enabled: bool | None = None):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._tensorboard = tensorboard
        self._file = None
        self._tb = None
        self.last: dict[str, float] = {}  # latest value of every metric, for summaries

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log scalar ``metrics`` (Python, numpy or JAX scalars) at integer ``step``."""
        values = {}
        for name, value in metrics.items():
            number = scalar_or_none(value)
            if number is None:
                raise ValueError(
                    f"metric {name!r} is not a scalar number ({type(value).__name__}); log "
                    "scalars only, e.g. float(x.mean())"
                )
            values[str(name)] = number
        self.last.update(values)
        if not self.enabled:
            return
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        line = {"step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._tensorboard:
            if self._tb is None:
                self._tb = _import_summary_writer()(logdir=str(self.run_dir / TENSORBOARD_DIR))
            for name, number in values.items():
                self._tb.add_scalar(name, float(number), int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Lines of a metrics.jsonl file (or of ``<run_dir>/metrics.jsonl``); [] when there is none.

    A torn last line (the process died mid-write) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
