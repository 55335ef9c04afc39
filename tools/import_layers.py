"""Checks that imports inside the package run one way: down its floors, and never in a circle.

The package is built in floors, lowest first (FLOORS). A module may import from its own floor or
lower ones, so each floor can be read, tested and changed knowing only what lies beneath it. Two
files that import each other (directly or through others) can only be understood together, so
cycles are refused too. Every import counts, at module level or inside a function, and a package's
``__init__.py`` counts as a file: a submodule importing from its own package's ``__init__`` is a
cycle whenever that ``__init__`` re-exports the submodule.

    python tools/import_layers.py            # checks the package beside this folder
    python tools/import_layers.py iapo_jax   # or the package at this path

Prints the arrows found, the upward ones and the cycles; exits 1 when there is any of the last two.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

# Lowest first. A floor with no package yet (pipelines) keeps its place for when it has one.
FLOORS = ("errors", "theory", "runtime", "parallel", "data", "models", "decoding", "rewards",
          "alignment", "testbed", "evaluation", "pipelines", "bench", "commands", "cli")

DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / "iapo_jax"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package by its __init__)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _imported_names(tree: ast.AST, package_of_file: str) -> set[str]:
    """Every dotted name an import statement anywhere in `tree` may load (relative ones resolved).

    ``from a.b import c`` may load a.b.c (a submodule) and always loads a.b, so both count.
    """
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: one dot is the file's own package, each more one level up
                parts = package_of_file.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_arrows(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name is cut back to the module defining it)."""
    files = module_files(package)

    def defining_module(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    arrows: dict[str, set[str]] = {}
    for module, path in files.items():
        package_of_file = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for name in _imported_names(ast.parse(path.read_text()), package_of_file):
            if name != package.name and not name.startswith(package.name + "."):
                continue
            target = defining_module(name)
            # The top-level package only holds lazy entry points; importing it imports no floor.
            if target and target not in (module, package.name):
                arrows.setdefault(module, set()).add(target)
    return arrows


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def upward_arrows(arrows: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The arrows from a module to a module on a higher floor."""
    return sorted((a, b) for a, targets in arrows.items() for b in targets
                  if floor(a) is not None and floor(b) is not None and floor(b) > floor(a))


def cycles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (strongly connected components of two or more)."""
    nodes = sorted(set(arrows) | {b for targets in arrows.values() for b in targets})
    index = {name: i for i, name in enumerate(nodes)}
    pairs = [(index[a], index[b]) for a, targets in arrows.items() for b in targets]
    rows, cols = zip(*pairs) if pairs else ((), ())
    graph = csr_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for name, label in zip(nodes, labels):
        groups.setdefault(label, []).append(name)
    return sorted(group for group in groups.values() if len(group) > 1)


def main(argv: list[str]) -> int:
    package = Path(argv[0]) if argv else DEFAULT_PACKAGE
    arrows = import_arrows(package.resolve())
    up, loops = upward_arrows(arrows), cycles(arrows)
    print(f"arrows {sum(len(t) for t in arrows.values())} upward {len(up)} cycles {len(loops)}")
    for a, b in up:
        print(f"  UP     {a} -> {b}")
    for group in loops:
        print(f"  CYCLE  {', '.join(group)}")
    return 1 if up or loops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
