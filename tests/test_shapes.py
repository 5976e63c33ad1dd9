"""Shape propagation: the storage-free meta run must record exactly what a real run records, or step aside."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
import models_zoo
from fxprune.passes import shapes as shapes_mod
from fxprune.passes.shapes import record_shapes


@pytest.mark.parametrize("name", models_zoo.names())
def test_meta_shapes_equal_real_shapes(name: str) -> None:
    model, x = models_zoo.get(name)
    gm = fx.symbolic_trace(model)
    meta, out = record_shapes(gm, x, meta=True)
    real, _ = record_shapes(gm, x)
    assert out is None, "the meta run was expected to stand in for the real one here"
    assert meta == real


class _CachesAnchors(nn.Module):
    """A user module that caches a tensor computed in forward (like Ultralytics' Detect anchors)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.anchors is None or self.anchors.shape != x.shape[-2:]:
            self.anchors = torch.arange(x.shape[-1], dtype=x.dtype).expand(x.shape[-2:]).clone()
        return x + self.anchors


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = _CachesAnchors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _CachesAnchors) or super().is_leaf_module(m, qualname)


def test_a_user_leaf_module_runs_for_real() -> None:
    net = _Net()
    gm = fx.GraphModule(net, _Tracer().trace(net))
    _, out = record_shapes(gm, (torch.randn(1, 3, 6, 6),), meta=True)
    assert out is not None  # the real run: nothing meta was cached on the module
    assert not net.head.anchors.is_meta


def test_dtype_mismatch_falls_back_to_the_real_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = models_zoo.get("resnet_basic")
    calls = []
    real_meta = shapes_mod._meta_shapes
    monkeypatch.setattr(shapes_mod, "_meta_shapes", lambda gm, xs: calls.append(real_meta(gm, xs)) or calls[-1])
    with pytest.raises(fxprune.ShapeError, match="example inputs"):
        fxprune.compile(model, 0.5, example_inputs=(x[0].long(),))
    assert calls and calls[0] is None


class _Norms(nn.Module):
    """Layer norms as modules and as functions, over the last dim and over the last two."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.ln2 = nn.LayerNorm((4, 4), elementwise_affine=False)
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.ln(y)
        y = torch.nn.functional.layer_norm(y, (8,), self.w, None)
        return self.ln2(y.permute(0, 3, 1, 2))


def test_layer_norm_shortcut_gives_the_real_shapes_and_refuses_a_mismatch() -> None:
    gm = fx.symbolic_trace(_Norms().eval())
    x = torch.randn(1, 3, 4, 4)
    assert record_shapes(gm, (x,), meta=True)[0] == record_shapes(gm, (x,))[0]
    with pytest.raises(fxprune.ShapeError, match="ln2"):  # 5 x 5 is not the normalised (4, 4): named
        record_shapes(gm, (torch.randn(1, 3, 5, 5),), meta=True)
