"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import models_zoo

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.parametrize("path", [f for f in FILES if BLOCK.search(f.read_text())], ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, x = models_zoo.get("resnet_basic")
    namespace: dict[str, object] = {"torch": torch, "model": model, "x": x, "__name__": "__docs__"}
    for i, block in enumerate(BLOCK.findall(path.read_text())):
        try:
            exec(compile(block, f"{path.name}:block{i}", "exec"), namespace)  # noqa: S102 - running our docs
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"{path.name} block {i} failed: {type(e).__name__}: {e}") from e
