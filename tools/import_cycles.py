"""Import circles inside ``fxprune/``: module-level and function-level imports (``TYPE_CHECKING`` blocks aside).

    .venv/bin/python tools/import_cycles.py      # prints each circle's modules and edges; exit 1 if any

``cycles()`` is what ``tests/test_layout.py`` checks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: Path) -> dict[str, Path]:
    mods = {}
    for p in package.rglob("*.py"):
        name = ".".join(p.relative_to(package.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The fxprune modules ``name`` imports anywhere in its body (not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for sub in node.body for n in ast.walk(sub))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(package: Path = ROOT / "fxprune") -> list[set[str]]:
    """Every set of modules that import each other in a circle (strongly connected, more than one)."""
    mods = _modules(package)
    graph = nx.DiGraph()
    for name, path in mods.items():
        graph.add_edges_from((name, t) for t in _imports(name, path, mods))
    return [c for c in nx.strongly_connected_components(graph) if len(c) > 1]


def main() -> int:
    found = cycles()
    for c in found:
        print(f"{len(c)} modules: {', '.join(sorted(c))}")
    if not found:
        print("no import circle in fxprune/")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
