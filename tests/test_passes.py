"""The pass protocol (``passes/base.GraphPass``): pre- and postconditions are checked by the base."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune.errors import InvariantError
from fxprune.passes.base import GraphPass, PassResult
from fxprune.passes.lower import LowerMultiheadAttention
from fxprune.passes.rewrite import RewritePass
from fxprune.rules import registry
from fxprune.stages import prepare


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).view(1, 8, 4, 4))


def test_an_in_place_pass_must_return_its_module() -> None:
    class Copying(GraphPass):
        def call(self, gm: fx.GraphModule) -> PassResult:
            return PassResult(fx.GraphModule(gm, gm.graph), True)

    with pytest.raises(InvariantError, match="in place"):
        Copying()(fx.symbolic_trace(Net()))


def test_a_modified_result_is_linted() -> None:
    class Breaks(GraphPass):
        def call(self, gm: fx.GraphModule) -> PassResult:
            nodes = list(gm.graph.nodes)
            with gm.graph.inserting_before(nodes[1]):
                gm.graph.call_function(torch.relu, (nodes[-2],))  # uses a value before it is defined
            return PassResult(gm, True)

    with pytest.raises(RuntimeError):
        Breaks()(fx.symbolic_trace(Net()))


def test_lowering_reports_its_changes() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    gm = fx.symbolic_trace(Attn().eval())
    result = LowerMultiheadAttention()(gm)
    assert result.modified and result.changes == ("mha",) and result.model is gm
    assert not LowerMultiheadAttention()(gm).modified  # nothing left to lower


def test_rewrite_postcondition_names_a_stale_literal(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the literal rewriter of ``view`` removed, the rewrite's own postcondition catches the stale size."""
    x = torch.randn(1, 3, 4, 4)
    assert fxprune.prune(Net().eval(), 0.5, example_inputs=(x,)).model.a.out_channels == 4
    spec = registry.method_spec("view")
    monkeypatch.setitem(registry._METHODS, "view", registry.OpSpec(rule=spec.rule))
    with pytest.raises(InvariantError, match="view"):
        fxprune.prune(Net().eval(), 0.5, example_inputs=(x,))


def test_rewrite_refuses_a_graph_it_was_not_planned_on() -> None:
    x = torch.randn(1, 3, 4, 4)
    plan = fxprune.prune(Net().eval(), 0.5, example_inputs=(x,)).plan
    a = prepare(Net().eval(), (x,), [], [])
    other = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    with pytest.raises(InvariantError, match="lacks"):
        RewritePass(a.deps, plan)(other)
    assert RewritePass(a.deps, plan, a.inputs)(a.gm).modified  # its own graph: pre- and postcondition hold
