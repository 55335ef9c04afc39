"""Progress bars with rate and ETA, and the summary table printed at the end of each job.

Bars draw only for a human: on process 0 with stderr attached to a terminal. In logs, CI and on
other processes they are silent, so output stays concise.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Mapping, Sequence, TextIO


def interactive() -> bool:
    """True on JAX process 0 when stderr is a terminal."""
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return False
    import jax

    return jax.process_index() == 0


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool | None = None,
    **tqdm_kwargs: Any,
):
    """A tqdm bar (rate and ETA shown by tqdm) that is disabled unless ``interactive()``.

    Use as an iterable wrapper or manually: ``bar = progress(total=n); bar.update(k); bar.close()``.
    """
    from tqdm.auto import tqdm

    if disable is None:
        disable = not interactive()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                file=sys.stderr, **tqdm_kwargs)


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
