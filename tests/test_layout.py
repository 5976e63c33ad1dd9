"""The package's import structure: no import circle (issue 26), module-level or inside a function."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cycles() -> list[set[str]]:
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cycles()


def test_no_import_circle() -> None:
    assert not [sorted(c) for c in _cycles()], "import circles in fxprune/"


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
