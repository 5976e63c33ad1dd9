"""Process state the compile pipeline touches for speed: the garbage collector and deferred code generation."""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune.errors import FxPruneError
from fxprune.fast import deferred_graph_module, generated
from fxprune.stages import gc_paused


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def test_gc_is_restored_after_compile_and_after_a_failure() -> None:
    assert gc.isenabled()
    fxprune.prune(Net().eval(), 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert gc.isenabled()
    with pytest.raises(FxPruneError):
        fxprune.prune(Net().eval(), 0.5, example_inputs=(torch.randn(1, 5, 8, 8),))  # wrong channel count
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_a_deferred_graph_module_generates_its_code_before_any_use() -> None:
    net = Net().eval()
    graph = fx.Tracer().trace(net)
    x = torch.randn(2, 3, 8, 8)
    for use in (lambda g: g(x), lambda g: g.code, str, copy.deepcopy, lambda g: pickle.loads(pickle.dumps(g))):
        gm = deferred_graph_module(net, graph, "Net")
        out = use(gm)
        assert "def forward" in gm.code
        if isinstance(out, nn.Module):
            torch.testing.assert_close(out(x), net(x))
    gm = deferred_graph_module(net, graph, "Net")
    torch.testing.assert_close(gm(x), net(x))


def test_the_compiled_model_is_a_plain_graph_module() -> None:
    r = fxprune.prune(Net().eval(), 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    model = r.model
    assert type(model).__mro__[1] is fx.GraphModule  # fx's own per-instance class, nothing deferred
    assert "def forward" in model.code
    x = torch.randn(2, 3, 8, 8)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert type(other).__mro__[1] is fx.GraphModule
        torch.testing.assert_close(other(x), model(x))
    assert generated(model) is model
