"""An op added from outside the package with one registration call: its coupling rule and its traits reach every
engine that asks (the graph's dependency analysis and the hidden-size probe), and the op tables of the passes
live in the registry only (``rules/traits.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
import fxprune.rules.registry as registry
from fxprune.hidden import HiddenSizeError, prune_hidden
from fxprune.rules.common import unary


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry as it is, restored after the test (a registration is global)."""
    registry.load_builtins()
    for table in ("_FUNCTIONS", "_METHODS", "_MODULES"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    monkeypatch.setattr(registry, "_type_cache", {})
    registry._FUNCTIONS.pop(F.hardshrink, None)  # as a fresh process has it (no entry)


class _Shrunk(nn.Module):
    """A tiny language model whose residual stream and MLP both go through ``F.hardshrink``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.down, self.head = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16), \
            nn.Linear(16, 50)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.hardshrink(self.embed(ids), 0.01)
        h = h + self.down(F.hardshrink(self.up(h), 0.05))
        return self.head(h)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Shrunk().eval()


IDS = (torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)),)


def test_one_registration_reaches_the_graph_and_the_hidden_size(fresh_registry: None) -> None:
    before = fxprune.prune(_model(), 0.5, example_inputs=IDS, verify=True)
    assert before.plan.n_dropped == 0  # no rule: hardshrink pins the MLP's channels
    with pytest.raises(HiddenSizeError, match="hardshrink"):
        prune_hidden(_model(), 0.5, example_inputs=IDS)

    fxprune.rules.register(F.hardshrink, rule=unary, traits={"elementwise"})  # the one call

    r = fxprune.prune(_model(), 0.5, example_inputs=IDS, verify=True)
    assert r.oracle.passed and r.model.up.out_features == 16 and r.model.down.in_features == 16
    h = prune_hidden(_model(), 0.5, example_inputs=IDS)
    assert h.model.embed.embedding_dim == 8 and h.model.head.in_features == 8
    assert registry.function_spec(F.hardshrink).traits == {"elementwise"}


def test_traits_add_up_and_are_names(fresh_registry: None) -> None:
    fxprune.rules.register("my_method", traits=("elementwise",))
    fxprune.rules.register("my_method", traits=("reduction",))
    assert registry.method_spec("my_method").traits == {"elementwise", "reduction"}
    assert "rotary" in registry.method_spec("mul").traits and "head_layout" in registry.method_spec("view").traits
    with pytest.raises(TypeError, match="collection of names"):
        fxprune.rules.register("my_method", traits="elementwise")


def test_the_passes_keep_no_op_table() -> None:
    """No set of ops (functions or method names) outside ``fxprune/rules``: the passes ask the registry
    (``fxprune/testing``'s sets name the fuzzer's own node kinds)."""
    root = Path(fxprune.__file__).parent
    op = r"(?:torch\.[\w.]+|F\.\w+|operator\.\w+)"
    table = re.compile(r"^_?[A-Z][A-Z_]* *(?::[^=]*)?= *(?:(?:frozenset\(|set\()?\{\s*(?:\"\w+\"|" + op + r")"
                       r"|\(\s*" + op + r")\s*,", re.MULTILINE)  # a set (not a dict) of ops or names, a tuple of ops
    found = [f"{p.relative_to(root)}: {m.group(0)[:40]}" for p in sorted(root.rglob("*.py"))
             if not {"rules", "testing"} & set(p.parts) for m in table.finditer(p.read_text())]
    assert found == [], found
