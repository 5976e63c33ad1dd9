"""The speed shortcuts (``fxprune/fast.py``) give what plain torch gives; the switch turns each one off."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
import models_zoo
from fxprune import fast


@pytest.fixture(autouse=True)
def _shortcuts_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests compare both settings themselves, whatever FXPRUNE_FAST says."""
    monkeypatch.setattr(fast, "ENABLED", True)


def _compile(model: nn.Module, x: torch.Tensor) -> fxprune.PruneResult:
    return fxprune.prune(model, 0.5, example_inputs=(x,), verify=True)


def test_same_result_with_the_shortcuts_off() -> None:
    model, (x,) = models_zoo.get("resnet_basic")
    on = _compile(model, x)
    with fast.disabled():
        assert not fast.ENABLED
        off = _compile(model, x)
    assert fast.ENABLED
    assert on.model.code == off.model.code
    assert on.oracle.passed and off.oracle.passed
    a, b = on.model.state_dict(), off.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (on.macs_before, on.macs_after, on.params_after) == (off.macs_before, off.macs_after, off.params_after)


def test_each_shortcut_is_off_when_the_switch_is() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    graph = fx.symbolic_trace(net).graph
    meta = torch.empty(1, 3, 8, 8, device="meta")
    conv = net[0].to("meta")
    with fast.disabled():
        assert type(fast.deferred_graph_module(net, graph, "Net")) is not fast._LazyGraphModule
        assert fast.meta_shape("call_module", "0", (meta,), {}, conv) is None
        assert fast.record_torch_function(torch.flatten, (), {}) is None
    if fast._LazyGraphModule is not None:
        assert isinstance(fast.deferred_graph_module(net, graph, "Net"), fast._LazyGraphModule)
    assert fast.meta_shape("call_module", "0", (meta,), {}, conv).shape == (1, 4, 8, 8)


def test_copy_is_deepcopy_when_off(monkeypatch) -> None:
    calls: list[type] = []
    real = fast.copy.deepcopy

    def spy(obj, memo=None):
        calls.append(type(obj))
        return real(obj, memo)

    monkeypatch.setattr(fast.copy, "deepcopy", spy)
    net = nn.Sequential(nn.Linear(2, 2))
    with fast.disabled():
        fast.copy_module(net, {})
    assert calls and calls[0] is nn.Sequential
    calls.clear()
    fast.copy_module(net, {})
    assert nn.Sequential not in calls  # the plain-module path copies the tree itself
