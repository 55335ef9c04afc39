"""Writes the Colab demos (*.ipynb, no outputs) from their reviewable sources in sources/.

Each source is a Python file in the "percent" cell format: a line `# %%` starts a code cell and
`# %% [markdown]` a markdown cell whose lines are comments ("# " is stripped). Anything before the
first marker is a note for reviewers and is left out. Every notebook starts with the shared setup
cell (sources/setup_cell.py): the Colab install, the SMALL switch and the device report.

    python experiments/notebooks/build_notebooks.py           # rewrite the notebooks
    python experiments/notebooks/build_notebooks.py --check   # exit 1 if one is out of date

Builds are deterministic (fixed cell ids, no outputs), so a rebuild of unchanged sources changes
nothing and `--check` can guard against notebooks edited by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
SETUP = SOURCES / "setup_cell.py"

# notebook name -> Colab runtime it asks for (None: any runtime; the analytic tool is numpy)
NOTEBOOKS = {"analytic_explorer": None, "decoding": "GPU", "ctrl": "GPU"}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Percent-format text -> [(kind, source)] with kind 'code' or 'markdown'."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if line.strip() == "# %% [markdown]" else "code"
            cells.append((kind, []))
        elif cells:
            kind, lines = cells[-1]
            if kind == "markdown":
                if line and not line.startswith("#"):
                    raise ValueError(f"markdown cell line is not a comment: {line!r}; start it with '# '")
                line = line[2:] if line.startswith("# ") else line[1:]
            lines.append(line)
    out = [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]
    empty = [i for i, (_, src) in enumerate(out) if not src.strip()]
    if empty:
        raise ValueError(f"cell {empty[0]} is empty; remove its '# %%' marker")
    return out


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`: the setup cell, then the cells of sources/<name>.py."""
    cells = [("code", SETUP.read_text().strip("\n"))]
    cells += parse_cells((SOURCES / f"{name}.py").read_text())
    nb_cells = []
    for i, (kind, src) in enumerate(cells):
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        cell = make(src)
        cell.id = f"{name}-{i:02d}"  # fixed ids: rebuilding unchanged sources gives the same file
        nb_cells.append(cell)
    metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    if NOTEBOOKS[name]:
        metadata["accelerator"] = NOTEBOOKS[name]
    nb = nbformat.v4.new_notebook(cells=nb_cells, metadata=metadata)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale notebooks, write nothing")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the .ipynb files")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = args.out / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python experiments/notebooks/build_notebooks.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
