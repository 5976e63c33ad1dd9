"""The package's import structure: no new import circle (issue 26).

One circle is left, written down here with its reason so that it can only shrink: the rule registry loads the
built-in entries lazily (before fx patches anything while tracing), and those entries take their MAC formulas
and shape functions from ``passes/macs.py`` and ``passes/shape_fns.py``, which look entries up in the registry.
It goes when each op family's file holds its whole entry (MAC formula and shape function included).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KNOWN = {frozenset({"fxprune.passes.macs", "fxprune.passes.shape_fns", "fxprune.rules", "fxprune.rules.builtin",
                    "fxprune.rules.registry"})}


def _cycles() -> list[set[str]]:
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cycles()


def test_no_new_import_circle() -> None:
    found = {frozenset(c) for c in _cycles()}
    new = [sorted(c) for c in found if not any(c <= k for k in KNOWN)]
    assert not new, f"new import circles: {new}"


def test_the_finder_sees_a_circle(tmp_path: Path) -> None:
    """A two-module circle through a function-level import is found (and a TYPE_CHECKING import is not)."""
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pkg = tmp_path / "fxprune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fxprune.b import g\n    return g\n")
    (pkg / "b.py").write_text("from fxprune import a\n\ndef g():\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fxprune.a import f\n")
    (pkg / "d.py").write_text("from fxprune.c import TYPE_CHECKING\n")
    assert [sorted(c) for c in module.cycles(pkg)] == [["fxprune.a", "fxprune.b"]]
