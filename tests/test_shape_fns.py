"""The meta run's shape functions (``passes/shape_fns.py``) against the kernels they stand in for."""

from __future__ import annotations

import copy
import itertools
import operator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxprune.passes.shape_fns import fast_meta
from fxprune.passes.shapes import record_shapes
from fxprune.passes.trace import trace


def _meta(v: Any) -> Any:
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(1, 5, shape, dtype=dtype)
    return torch.rand(shape, dtype=dtype) + 0.5


def _agrees(op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any = None) -> bool:
    """fast_meta gives the kernel's shape, dtype and (contiguous) layout, or declines; never a wrong answer.

    Returns whether it answered."""
    call = (target if op == "call_function" else mod if op == "call_module"
            else lambda *a, **k: getattr(a[0], target)(*a[1:], **k))
    try:
        want = call(*args, **kwargs)  # the real CPU kernel
    except Exception:  # noqa: BLE001 - the real op rejects: fast_meta must not invent a result
        want = None
    meta_mod = None if mod is None else _on_meta(mod)
    meta_args, meta_kwargs = tuple(map(_meta, args)), {k: _meta(v) for k, v in kwargs.items()}
    try:
        got = fast_meta(op, target, meta_args, meta_kwargs, meta_mod)
    except RuntimeError:
        assert want is None, "fast_meta raised where the kernel succeeds"
        return True
    if got is None:
        return False
    assert want is not None, f"fast_meta answered {got.shape} where the kernel raises"
    assert (got.shape, got.dtype, got.is_meta) == (want.shape, want.dtype, True)
    kernel = (meta_mod if op == "call_module" else call)(*meta_args, **meta_kwargs)  # what the meta run did before
    assert (got.shape, got.dtype, got.stride()) == (kernel.shape, kernel.dtype, kernel.stride())
    return True


def _on_meta(mod: nn.Module) -> nn.Module:
    return copy.deepcopy(mod).to("meta")


SHAPES = [((2, 3, 4, 5), (1, 3, 1, 1)), ((3, 1), (1, 4)), ((), (2, 3)), ((2, 3), (4, 3)), ((5,), (5,))]
DTYPES = [torch.float32, torch.float16, torch.int64, torch.int32, torch.bool]
BINARY = [(operator.add, "call_function"), (operator.sub, "call_function"), (operator.mul, "call_function"),
          (operator.truediv, "call_function"), (torch.add, "call_function"), (torch.mul, "call_function"),
          (torch.div, "call_function"), ("add", "call_method"), ("mul", "call_method"), ("div", "call_method"),
          ("sub", "call_method")]


@pytest.mark.parametrize(("target", "op"), BINARY, ids=lambda v: getattr(v, "__name__", str(v)))
def test_binary_ops_match_the_kernel(target: Any, op: str) -> None:
    answered = 0
    for (sa, sb), da, db in itertools.product(SHAPES, DTYPES, DTYPES):
        answered += _agrees(op, target, (_tensor(sa, da), _tensor(sb, db)), {})
    for (sa, _), da, scalar in itertools.product(SHAPES, DTYPES, [2, 2.5, True]):
        answered += _agrees(op, target, (_tensor(sa, da), scalar), {})
        answered += _agrees(op, target, (scalar, _tensor(sa, da)), {})
    assert answered > 100  # it does stand in for the kernel in the common cases


def test_binary_ops_decline_what_they_do_not_model() -> None:
    x = torch.rand(2, 3, 4, 5, device="meta")
    cl = x.to(memory_format=torch.channels_last)
    assert fast_meta("call_function", operator.add, (cl, x), {}) is None  # layout would propagate
    assert fast_meta("call_function", torch.add, (x, x), {"alpha": 2}) is None
    assert fast_meta("call_function", torch.add, (2, x), {}) is None  # torch.add needs a tensor first
    assert fast_meta("call_function", operator.add, (2, 3), {}) is None
    assert fast_meta("call_function", operator.add, (x, torch.rand(3)), {}) is None  # a CPU tensor: run it
    assert fast_meta("call_function", operator.mul, (x, np.float32(2.0)), {}) is None  # numpy scalar: run it


@pytest.mark.parametrize("name", ["mean", "sum"])
def test_reductions_match_the_kernel(name: str) -> None:
    x = torch.rand(2, 3, 4, 5)
    answered = 0
    for dim in [None, 1, -1, (2, 3), [0, -1], (1, 1), 4, -5, (), True]:
        for keepdim in [False, True]:
            kwargs = {} if dim is None else {"dim": dim}
            answered += _agrees("call_method", name, (x,), {**kwargs, "keepdim": keepdim})
            if dim is not None:
                answered += _agrees("call_function", getattr(torch, name), (x, dim, keepdim), {})
    answered += _agrees("call_method", name, (x,), {})
    assert answered >= 15
    assert fast_meta("call_method", "sum", (torch.zeros(2, 3, dtype=torch.int64, device="meta"), 1), {}) is None
    assert fast_meta("call_method", "mean", (x.to("meta"), 1), {"dtype": torch.float64}) is None


def test_modules_match_the_kernel() -> None:
    lin = nn.Linear(6, 4)
    for shape in [(2, 6), (6,), (2, 3, 6), (2, 5)]:
        _agrees("call_module", "lin", (torch.rand(shape),), {}, lin)
    assert _agrees("call_module", "lin", (torch.rand(3, 6),), {}, lin)
    assert not _agrees("call_module", "lin", (torch.rand(3, 6, dtype=torch.float64),), {}, lin)
    for pool, shape in [(nn.AdaptiveAvgPool2d(1), (2, 3, 8, 8)), (nn.AdaptiveAvgPool2d((2, None)), (3, 8, 7)),
                        (nn.AdaptiveAvgPool1d(3), (2, 4, 9)), (nn.AdaptiveAvgPool3d((1, 2, 3)), (1, 2, 4, 4, 4))]:
        assert _agrees("call_module", "pool", (torch.rand(shape),), {}, pool)


CONVS = [
    (nn.Conv2d(4, 6, 3), (2, 4, 9, 8)), (nn.Conv2d(4, 6, 3, stride=2, padding=1), (1, 4, 9, 8)),
    (nn.Conv2d(4, 8, 3, groups=4, dilation=2, padding=2), (1, 4, 7, 7)), (nn.Conv2d(4, 6, (1, 3), padding="same"), (1, 4, 5, 6)),
    (nn.Conv2d(4, 6, 2, padding="same", dilation=2), (1, 4, 5, 6)), (nn.Conv2d(4, 6, 3, padding="valid", bias=False), (4, 7, 7)),
    (nn.Conv1d(3, 5, 4, stride=3), (2, 3, 20)), (nn.Conv3d(2, 4, 3, padding=(1, 0, 1)), (1, 2, 5, 6, 7)),
    (nn.Conv2d(4, 6, 1), (1, 4, 1, 1)), (nn.Conv2d(1, 6, 3), (2, 1, 8, 8)), (nn.Conv2d(4, 6, 5), (1, 4, 3, 3)),
    (nn.Conv2d(4, 6, 3), (1, 5, 8, 8)), (nn.Conv2d(4, 6, 3, padding_mode="reflect", padding=1), (1, 4, 8, 8)),
    (nn.Conv2d(4, 6, 3, stride=2, padding="valid"), (1, 4, 8, 8)), (nn.Conv2d(6, 6, 3, groups=3), (1, 6, 8, 8)),
]


def test_conv_matches_the_kernel() -> None:
    answered = sum(_agrees("call_module", "conv", (torch.rand(shape),), {}, conv) for conv, shape in CONVS)
    assert answered >= 9
    x = torch.rand(2, 4, 9, 8).to(memory_format=torch.channels_last)
    assert not _agrees("call_module", "conv", (x,), {}, nn.Conv2d(4, 6, 3))  # the layout would propagate
    assert not _agrees("call_module", "conv", (torch.rand(1, 4, 1, 1),), {}, nn.Conv2d(4, 6, 1))  # ambiguous


def test_a_stale_linear_weight_is_left_to_the_kernel() -> None:
    lin = nn.Linear(6, 4).to("meta")
    lin.weight = nn.Parameter(torch.empty(4, 5, device="meta"))  # in_features says 6: the kernel decides
    assert fast_meta("call_module", "lin", (torch.empty(2, 6, device="meta"),), {}, lin) is None


class SE(nn.Module):
    """timm-style squeeze-excite: mean over a tuple of dims with keepdim, then mul/add/div by a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 8)
        self.pool = nn.AdaptiveAvgPool2d((1, None))

    def forward(self, x):
        y = self.conv(x)
        s = y.mean((2, 3), keepdim=True)
        y = y * s.sigmoid() + 1.0
        z = self.fc(y.sum(-1).permute(0, 2, 1))
        return y / 2, z, self.pool(y), y.mean()


def test_meta_run_with_shape_functions_equals_the_real_run() -> None:
    gm, _ = trace(SE().eval())
    x = (torch.randn(2, 3, 9, 10),)
    meta, _ = record_shapes(gm, x, meta=True)
    real, _ = record_shapes(gm, x, meta=False)
    assert meta == real


def test_interpolate_matches_the_kernel() -> None:
    F = torch.nn.functional
    answered = 0
    inputs = [torch.rand(2, 3, 5, 6), torch.rand(1, 2, 7), torch.rand(1, 2, 3, 4, 5), torch.rand(2, 3, 5, 6).double(),
              torch.rand(2, 3, 5, 6).half(), torch.rand(1, 1, 1, 1), torch.rand(2, 3, 5, 6).to(memory_format=torch.channels_last)]
    modes = ["nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area"]
    for x, mode, corners in itertools.product(inputs, modes, [None, False, True]):
        n = x.dim() - 2
        for size in [9, (4, 8)[:n] if n < 3 else (2, 3, 4), torch.Size([3] * n), [2] * n, (0,) * n, (3,) * (n + 1)]:
            answered += _agrees("call_function", F.interpolate, (x,), {"size": size, "mode": mode, "align_corners": corners})
        answered += _agrees("call_function", F.interpolate, (x, 6, None, mode, corners), {})
        answered += _agrees("call_function", F.interpolate, (x,), {"scale_factor": 2.0, "mode": mode})
        answered += _agrees("call_function", F.interpolate, (x, 6), {"mode": mode, "antialias": True})
    assert answered >= 60
