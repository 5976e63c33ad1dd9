"""Activation-aware importance (``importance="activation"`` on ``calibration`` batches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from tests.conftest import check_pruned


class Silent(nn.Module):
    """Hidden channels 0-3 have the largest weights, but their ReLU never fires on the data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.a.weight[:4] *= 10.0
            self.a.bias[:4] = -1e3  # always negative after a: ReLU outputs 0
            self.b.weight[:, :4] *= 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _kept(result: fxprune.PruneResult) -> set[int]:
    (group,) = [g for g in result.plan.groups if g.prunable]
    return set(result.plan.kept[group.id])


def test_silent_channels_go_first() -> None:
    model, x = Silent().eval(), torch.randn(4, 8)
    batches = [torch.randn(16, 8) for _ in range(4)]
    by_magnitude = fxprune.prune(model, 0.5, example_inputs=(x,))
    assert {0, 1, 2, 3} <= _kept(by_magnitude)  # the largest weights win on magnitude
    r = check_pruned(model, (x,), importance="activation", calibration=batches)
    assert not {0, 1, 2, 3} & _kept(r)  # what never carries signal goes first
    quarter = fxprune.prune(model, 0.25, example_inputs=(x,), importance="activation", calibration=batches)
    assert _kept(quarter) == set(range(4, 16))  # exactly the silent ones, so the output does not change
    with torch.no_grad():
        assert torch.allclose(quarter.model(batches[0]), model(batches[0]), atol=1e-5)


def test_activation_needs_calibration() -> None:
    with pytest.raises(fxprune.ArgumentError, match="calibration"):
        fxprune.prune(Silent().eval(), 0.5, example_inputs=(torch.randn(2, 8),), importance="activation")
    with pytest.raises(fxprune.ArgumentError, match="at least one"):
        fxprune.Activations([])


def test_groups_without_a_reader_fall_back_to_l2() -> None:
    """Conv a is read only by a grouped conv, whose input channels are not its weight's dim 1: l2 decides."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2)).eval()
    x = torch.randn(1, 3, 8, 8)
    act = fxprune.prune(net, 0.5, example_inputs=(x,), importance=fxprune.Activations([x]))
    l2 = fxprune.prune(net, 0.5, example_inputs=(x,))
    assert _kept(act) == _kept(l2) and act.model.get_submodule("0").out_channels == 4


class Untraceable(nn.Module):
    """The root branches on data (fx cannot trace it); its block is pruned as a part, on what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(5, 8)  # the root's inputs do not fit the block: only its own inputs do
        self.block = Silent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # never true: data-dependent control flow
            x = -x
        return self.block(self.scale(x) * 3.0)


@pytest.mark.parametrize("how", ["name", "object"])
def test_parts_are_measured_on_what_reaches_them(how: str) -> None:
    torch.manual_seed(1)
    model, x = Untraceable().eval(), torch.randn(4, 5)
    batches = [torch.randn(16, 5) for _ in range(4)]
    kwargs = ({"importance": "activation", "calibration": batches} if how == "name"
              else {"importance": fxprune.Activations(batches)})
    r = fxprune.prune(model, 0.25, example_inputs=(x,), ignore=["scale"], **kwargs)
    assert [p.name for p in r.parts if p.params_after < p.params_before] == ["block"]
    assert r.model.block.a.out_features == 12
    with torch.no_grad():  # exactly the silent channels went: the output is unchanged
        assert torch.allclose(r.model(batches[0]), model(batches[0]), atol=1e-5)
