"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a namespace).

A block right after a ``<!-- not tested: why -->`` line is skipped (a torchrun script, an install).
The namespace offers what the prose assumes: ``model`` (a models_zoo ResNet), ``x`` (an input tensor),
``train_loader``/``loader`` (a few random labelled batches) and ``accuracy(model) -> float``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxprune.rules.registry as registry
import models_zoo

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not tested[^>]*-->\n)?```python\n(.*?)```", re.S)


def _namespace() -> dict[str, object]:
    model, (x,) = models_zoo.get("resnet_basic")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
    loader = DataLoader(data, batch_size=16)

    def accuracy(m: torch.nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            hits = sum(int((m(a).argmax(1) == b).sum()) for a, b in loader)
        return hits / len(data)

    return {"torch": torch, "model": model, "x": x, "train_loader": loader, "loader": loader,
            "accuracy": accuracy, "__name__": "__docs__"}


@pytest.mark.parametrize("path", [f for f in FILES if "```python" in f.read_text()], ids=lambda p: p.name)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    registry.load_builtins()  # what a block registers (docs/adding-rules.md) stays in the block's test
    for table in ("_FUNCTIONS", "_METHODS", "_MODULES"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    monkeypatch.setattr(registry, "_type_cache", {})
    namespace = _namespace()
    for i, (skip, block) in enumerate(BLOCK.findall(path.read_text())):
        if skip:
            continue
        try:
            exec(compile(block, f"{path.name}:block{i}", "exec"), namespace)  # noqa: S102 - running our docs
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"{path.name} block {i} failed: {type(e).__name__}: {e}") from e
