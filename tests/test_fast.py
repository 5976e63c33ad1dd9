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


class _ReadsChild(nn.Module):
    """Reads the mode of a child, not its own, from a helper function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return _scaled(y, self.bn)


def _scaled(y: torch.Tensor, m: nn.Module) -> torch.Tensor:
    return y * 2 if getattr(m, "training") else y  # noqa: B009 - the read must be seen whatever its spelling


class _ShadowsTraining(nn.Sequential):
    training = False  # a class attribute of that name shadows the watch's property: always traced twice


def test_the_train_mode_trace_is_skipped_only_when_no_mode_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxprune.passes import train_mode

    calls: list[str] = []
    real = train_mode.train_mode_difference

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append("retrace")
        return real(*args, **kwargs)

    monkeypatch.setattr("fxprune.stages.train_mode_difference", counted)
    x = torch.randn(1, 3, 8, 8)
    plain = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Conv2d(8, 4, 1)).eval()
    fxprune.prune(plain, 0.5, example_inputs=(x,))
    assert calls == []  # leaves read their own mode at run time: nothing traced reads it
    with fast.disabled():
        fxprune.prune(plain, 0.5, example_inputs=(x,))
    assert calls == ["retrace"]  # the switch off: always traced in train mode too
    calls.clear()
    r = fxprune.prune(_ReadsChild().eval(), 0.5, example_inputs=(x,))
    assert calls == ["retrace"] and r.model.eval()(x).shape == (1, 8, 8, 8)
    with pytest.raises(fxprune.TrainModeError):
        r.model.train()(x)
    calls.clear()
    fxprune.prune(_ShadowsTraining(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)).eval(), 0.5, example_inputs=(x,))
    assert calls == ["retrace"]
    assert "training" not in vars(nn.Module)  # the property is gone after each trace
