"""Progress of long work (rate and ETA), and the summary table printed at the end of each job.

Where it shows, on JAX process 0 only: a tqdm bar in a terminal and in a notebook; in logs (stderr
not a terminal: CI, a batch scheduler, ``2> log``) a plain line every ``IAPO_PROGRESS_SECONDS``
(default 30) seconds, so a long run says where it is without filling its log with bar redraws.
``--quiet`` (``quiet_progress(True)``) silences both; other processes never show any.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence, TextIO

INTERVAL_ENV = "IAPO_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
_quiet = False


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Within the block, progress bars and lines are off (``quiet``) or back to normal."""
    global _quiet
    previous, _quiet = _quiet, bool(quiet)
    try:
        yield
    finally:
        _quiet = previous


def _main_process() -> bool:
    if "jax" not in sys.modules:  # nothing distributed has started, so this is the only process
        return True
    import jax

    return jax.process_index() == 0


def in_notebook() -> bool:
    """True inside a Jupyter / Colab kernel (its stderr is no terminal, yet a person watches)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def interactive() -> bool:
    """True on JAX process 0 when a person watches: stderr is a terminal, or a notebook."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return (tty or in_notebook()) and _main_process()


def progress_mode() -> str:
    """"off" (--quiet, or not process 0), "bar" (a person watches) or "lines" (a log)."""
    if _quiet or not _main_process():
        return "off"
    return "bar" if interactive() else "lines"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool | None = None,
    **tqdm_kwargs: Any,
):
    """A progress display for a loop: a tqdm bar, periodic log lines or nothing (see the module
    docstring); ``disable`` forces a bar on (False) or off (True).

    Use as an iterable wrapper or manually: ``bar = progress(total=n); bar.update(k); bar.close()``.
    """
    mode = progress_mode() if disable is None else ("off" if disable else "bar")
    if mode == "lines":
        return LogProgress(iterable, total=total, desc=desc, unit=unit,
                           initial=int(tqdm_kwargs.get("initial", 0) or 0))
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=mode == "off",
                dynamic_ncols=True, file=sys.stderr, **tqdm_kwargs)


class LogProgress:
    """tqdm's interface (iterate, ``update``, ``close``, ``set_postfix``) as one line every
    ``interval`` seconds: ``desc: 5/12 step (42%), 3.1 s/step, 22 s left``; a last line on close
    when any was printed."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str | None = None, unit: str = "it", initial: int = 0,
                 interval: float | None = None, file: TextIO | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # as tqdm: ``initial`` counts towards a given total only
        self.total, self.desc, self.unit = total, desc or "progress", unit
        self.n, self._start_n = initial, initial
        self.interval = _interval() if interval is None else interval
        self._file = file
        self._start = self._last = time.monotonic()
        self._printed, self._closed, self._postfix = False, False, ""

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={_cell(v, '.4g')}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._printed:
            self._emit(time.monotonic(), final=True)

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = time.monotonic() if now is None else now
        elapsed, done = now - self._start, self.n - self._start_n
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if final:
            parts.append(f"done in {_seconds(elapsed)}")
        elif done > 0:
            per = elapsed / done
            parts.append(f"{per:.3g} s/{self.unit}" if per >= 1 else f"{1 / per:.3g} {self.unit}/s")
            if self.total and self.total > self.n:
                parts.append(f"{_seconds(per * (self.total - self.n))} left")
        if self._postfix:
            parts.append(self._postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        self._printed = True
        print(self.line(now, final), file=self._file or sys.stderr, flush=True)


def _seconds(value: float) -> str:
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else format(value, floatfmt)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _cell(value.item(), floatfmt)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    columns: Sequence[str] | None = None,
    *,
    floatfmt: str = ".6g",
    title: str | None = None,
) -> str:
    """A plain-text table. ``rows`` is a list of dicts, or one dict shown as name/value rows."""
    if isinstance(rows, Mapping):
        rows = [{"name": k, "value": v} for k, v in rows.items()]
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c, ""), floatfmt) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    lines = [title] if title else []
    lines += [fmt(columns), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    columns: Sequence[str] | None = None,
    *,
    title: str | None = None,
    file: TextIO | None = None,
    floatfmt: str = ".6g",
) -> None:
    """Print ``format_table`` to stderr (default), so stdout stays free for a job's own output."""
    print(format_table(rows, columns, floatfmt=floatfmt, title=title), file=file or sys.stderr)
