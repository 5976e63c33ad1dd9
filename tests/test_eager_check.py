"""The eager check at a smaller size: used only where it cannot hide a difference, full size otherwise.

``passes/eager_check.py`` compares the traced graph with eager PyTorch. For a shape-generic graph with image
inputs it first compares at a quarter of the side; a difference or a failure there sends it to full size.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import TraceError
from fxprune.passes import eager_check


@pytest.fixture
def sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shape of every comparison the check runs."""
    seen: list[tuple[int, ...]] = []
    original = eager_check._compare

    def spy(gm: Any, work: Any, model: Any, inputs: tuple[Any, ...]) -> Any:
        seen.append(tuple(inputs[0].shape))
        return original(gm, work, model, inputs)

    monkeypatch.setattr(eager_check, "_compare", spy)
    return seen


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


class FixedSize(Plain):
    """Flattens to a fixed feature count: only the example's size runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 64 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x))).flatten(1))


class TracingAware(Plain):
    """Takes another branch while fx traces it: the graph is not the model, at every size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        if not torch.fx._symbolic_trace.is_fx_tracing():
            y = y * 2 + 1
        return self.head(self.c2(y).mean((2, 3)))


class ShapeBranch(Plain):
    """Branches on its input's size: traced with example values (``output="module"`` lets branches follow the
    example), so the check stays at full size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        if x.shape[-1] > 64:
            y = y * 2
        return self.head(self.c2(y).mean((2, 3)))


def _compile(model: nn.Module, output: str = "graph") -> nn.Module:
    torch.manual_seed(0)
    return fxprune.compile(model.eval(), 0.5, example_inputs=(torch.randn(1, 3, 128, 128),), output=output)


def test_shape_generic_graph_is_checked_once_at_the_smaller_size(sizes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    _compile(Plain())
    assert sizes == [(1, 3, 64, 64)]


def test_a_model_that_only_runs_at_its_size_is_checked_at_full_size(sizes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    _compile(FixedSize())
    assert sizes == [(1, 3, 64, 64), (1, 3, 128, 128)]


def test_a_difference_at_the_smaller_size_is_confirmed_at_full_size(sizes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    with pytest.raises(TraceError, match="differs from eager PyTorch"):
        _compile(TracingAware())
    assert sizes[:2] == [(1, 3, 64, 64), (1, 3, 128, 128)]  # then its parts, each on its own inputs


def test_a_graph_traced_with_example_values_is_checked_at_full_size_only(sizes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    model = ShapeBranch().eval()
    small = _compile(model, output="module")
    assert sizes == [(1, 3, 128, 128)]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert small(x).shape == model(x).shape


@pytest.mark.parametrize("inputs", [
    (torch.randint(0, 10, (1, 64, 64)),),  # not floating
    (torch.randn(1, 8, 64),),  # not an image
    (torch.randn(1, 3, 48, 64),),  # a side that is no multiple of 32
    (torch.randn(1, 3, 64, 64),),  # already small
    (torch.randn(1, 3, 128, 128), torch.randint(0, 3, (1, 64))),  # another input beside the image
])
def test_smaller_inputs_only_for_images_with_32_multiple_sides(inputs: tuple[Any, ...]) -> None:
    assert eager_check.smaller_inputs(inputs) is None


def test_smaller_inputs_quarter_the_side_to_a_multiple_of_32() -> None:
    (x,) = eager_check.smaller_inputs((torch.randn(2, 3, 640, 224),))
    assert tuple(x.shape) == (2, 3, 160, 64)
    (y,) = eager_check.smaller_inputs((torch.randn(1, 3, 96, 128),))
    assert tuple(y.shape) == (1, 3, 64, 64)


class _Writes(nn.Module):
    """Writes state three ways in its forward: in place, through ``.data``, and by replacing a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.conv.weight.data.clamp_(-0.1, 0.1)
        self.seen = self.seen + 1
        return self.lin(self.conv(x).mean((2, 3)))


def test_the_write_watch_sees_every_way_a_forward_writes_state() -> None:
    model = _Writes()
    watch = eager_check._WriteWatch(model)
    with watch, torch.no_grad():
        model(torch.randn(1, 3, 4, 4))
    assert watch.changed() == {"calls", "seen", "conv.weight"}
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    quiet = eager_check._WriteWatch(plain)
    with quiet, torch.no_grad():
        plain(torch.randn(1, 3, 4, 4))
    assert quiet.changed() == set()
