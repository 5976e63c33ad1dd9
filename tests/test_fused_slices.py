"""A fused projection sliced into pieces with ``x[..., a:b]`` (Phi-3's qkv_proj): the slice couples channel ranges.

Output channel ``j`` of ``x[..., a:b]`` is input channel ``a + j``; after pruning, each bound becomes the number of
kept channels below it. Slices with another step, or with bounds computed at run time, still pin their dim.
"""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.rules.tensor_ops import slice_range
from tests.conftest import check_pruned

# (q, k, v) slices of a 24-wide fused projection: plain bounds, negative bounds and open ends, clipped bounds.
SLICES = {
    "plain": (slice(0, 8), slice(8, 16), slice(16, 24)),
    "negative": (slice(None, -16), slice(-16, -8), slice(-8, None)),
    "clipped": (slice(-100, 8), slice(8, -8), slice(16, 100)),
}


class FusedQKV(nn.Module):
    """A fused Linear sliced into three 8-wide parts that meet channel by channel (``relu(q) * k + v``)."""

    def __init__(self, slices: tuple[slice, slice, slice]) -> None:
        super().__init__()
        self.slices = slices
        self.fused, self.out = nn.Linear(6, 24), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x)
        q, k, v = (y[..., s] for s in self.slices)
        return self.out(torch.relu(q) * k + v)


class FusedConv(nn.Module):
    """A fused conv sliced into uneven parts (4, 8, 12 channels) that each feed their own conv."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = nn.Conv2d(3, 24, 3, padding=1)
        self.a, self.b, self.c = nn.Conv2d(4, 2, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fused(x))
        return self.a(y[:, :4]) + self.b(y[:, 4:12]) + self.c(y[:, -12:])


class Strided(nn.Module):
    """A step-2 slice of the channel dim: not a contiguous range, so the dim stays pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.fused, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fused(x))[:, ::2])


class FusedAttention(nn.Module):
    """Self-attention with one fused qkv Linear (4 heads of 8), sliced as Phi-3 does."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = (t.view(b, s, -1, 8).transpose(1, 2) for t in (qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1))


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of ``original`` the pruned weight kept (rows of random weights are distinct)."""
    return [int(torch.nonzero((original == row).all(1))[0]) for row in pruned]


@pytest.mark.parametrize("style", list(SLICES))
def test_fused_linear_slices_follow_the_kept_channels(style: str) -> None:
    torch.manual_seed(0)
    model, x = FusedQKV(SLICES[style]).eval(), torch.randn(5, 6)
    r = check_pruned(model, (x,), 0.5)
    assert r.oracle is not None and r.oracle.passed
    assert r.model.fused.out_features == 12 and r.model.out.in_features == 4
    kept = _kept_rows(model.fused.weight, r.model.fused.weight)
    assert [k % 8 for k in kept[:4]] * 3 == [k % 8 for k in kept]  # the same channel of q, k and v
    masked = copy.deepcopy(model)  # the original with every removed row of the fused layer zeroed
    dropped = [i for i in range(24) if i not in kept]
    with torch.no_grad():
        masked.fused.weight[dropped] = 0
        masked.fused.bias[dropped] = 0
        assert torch.allclose(r.model(x), masked(x), atol=1e-6)
    bounds = [slice_range(n.args[1][-1], 12) for n in r.model.graph.nodes if n.target is operator.getitem]
    assert bounds == [(0, 4), (4, 8), (8, 12)]


def test_uneven_slices_of_a_conv_each_keep_half() -> None:
    torch.manual_seed(0)
    r = check_pruned(FusedConv().eval(), (torch.randn(1, 3, 8, 8),), 0.5)
    assert r.oracle is not None and r.oracle.passed
    assert (r.model.a.in_channels, r.model.b.in_channels, r.model.c.in_channels) == (2, 4, 6)
    assert r.model.fused.out_channels == 12


def test_step_two_slice_still_pins() -> None:
    torch.manual_seed(0)
    r = check_pruned(Strided().eval(), (torch.randn(1, 3, 8, 8),), 0.5, expect_shrink=False)
    assert r.oracle is not None and r.oracle.passed
    assert r.model.fused.out_channels == 16


def test_fused_attention_loses_whole_heads() -> None:
    torch.manual_seed(0)
    model = FusedAttention().eval()
    r = check_pruned(model, (torch.randn(2, 5, 32),), 0.5, prune_heads=True)
    assert r.model.qkv.out_features == 48 and r.model.o.in_features == 16  # 2 heads of 8, in q, k and v
    kept = _kept_rows(model.qkv.weight, r.model.qkv.weight)
    assert all(sum(1 for k in kept if k // 8 == h) == 8 for h in {k // 8 for k in kept})  # whole heads only
    assert [k % 32 for k in kept[:16]] * 3 == [k % 32 for k in kept]  # the same heads of q, k and v


def test_onnx_of_a_fused_slice_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "fused.onnx"
    model, x = FusedConv().eval(), torch.randn(1, 3, 8, 8)
    r = fxprune.prune(model, 0.5, example_inputs=(x,), verify=True, onnx=str(path))
    assert r.oracle is not None and r.oracle.passed
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = r.model(x).numpy()
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bounds_computed_at_run_time_still_pin() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fused(x)
            return self.out(y[:, : y.shape[1] // 2])

    gm = fx.symbolic_trace(Computed())
    assert any(isinstance(n.args[1][1].stop, fx.Node) for n in gm.graph.nodes if n.op == "call_function"
               and n.target is operator.getitem and isinstance(n.args[1], tuple))
    r = check_pruned(Computed().eval(), (torch.randn(1, 3, 8, 8),), 0.5, expect_shrink=False)
    assert r.model.fused.out_channels == 16


def test_slice_range_reads_only_step_one_int_bounds() -> None:
    assert slice_range(slice(None, -16), 24) == (0, 8)
    assert slice_range(slice(-8, None), 24) == (16, 24)
    assert slice_range(slice(10, 5), 24) == (10, 10)
    assert slice_range(slice(0, 8, 2), 24) is None
    assert slice_range(slice(0, 8, 1), 24) == (0, 8)
    assert slice_range(slice(0.0, 8), 24) is None
