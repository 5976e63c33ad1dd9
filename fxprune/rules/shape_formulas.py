"""Shape functions: the meta result of an op computed in Python, for the ops whose meta kernels are slow or
absent (each is the ``shape`` field of its ops' registry entries, ``rules/builtin.py``); ``passes/shape_fns.py``
looks them up for a node. A function returns None when it cannot answer; the meta kernel then runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

Shape = tuple[int, ...]
ShapeFn = Callable[[tuple[Any, ...], dict[str, Any]], "torch.Tensor | None"]


def dense(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta and t.is_contiguous() and t.layout == torch.strided


def _ambiguous_layout(x: torch.Tensor, n_spatial: int) -> bool:
    """A contiguous input that is also channels-last contiguous (``[N, C, 1, 1]``): on meta the input alone
    picks the output layout of a conv or a resampling, so such an input is left to the kernel."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(n_spatial)
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _operand(v: Any) -> bool:
    """A contiguous meta tensor or a plain Python int/float; nothing boolean (``-`` rejects bools), no numpy
    scalars (``torch.result_type`` does not take them)."""
    if isinstance(v, torch.Tensor):
        return dense(v) and v.dtype != torch.bool
    return type(v) in (int, float)


def _binary(true_divide: bool, tensor_first: bool) -> ShapeFn:
    def fn(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        if kwargs or len(args) != 2 or not all(map(_operand, args)):
            return None
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        if not tensors or (tensor_first and not isinstance(args[0], torch.Tensor)):
            return None
        dtype = torch.result_type(*args)
        if true_divide and not (dtype.is_floating_point or dtype.is_complex):
            dtype = torch.get_default_dtype()
        return torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)), dtype=dtype, device="meta")

    return fn


def _reduce_shape(x: torch.Tensor, dim: Any, keepdim: bool) -> Shape | None:
    rank = max(1, x.dim())
    if dim is None:
        dims = set(range(x.dim()))
    else:
        listed = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else ()
        if not listed or not all(isinstance(d, int) and not isinstance(d, bool) and -rank <= d < rank for d in listed):
            return None
        dims = {d % rank for d in listed}
        if len(dims) != len(listed):
            return None  # a repeated dim: the kernel raises
    return tuple(1 if i in dims else s for i, s in enumerate(x.shape) if keepdim or i not in dims)


def reduction(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``mean``/``sum`` of a floating tensor over ``dim`` (the dtype is kept; integer sums promote)."""
    if not args or len(args) > 3 or not dense(args[0]) or set(kwargs) - {"dim", "keepdim"}:
        return None
    x = args[0]
    if not x.dtype.is_floating_point:
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not isinstance(keepdim, bool) or (dim is None and (len(args) > 1 or kwargs)):
        return None  # ``keepdim`` or an explicit None without a dim: overloads vary by version
    shape = _reduce_shape(x, dim, keepdim)
    return None if shape is None else torch.empty(shape, dtype=x.dtype, device="meta")


_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_RESAMPLE_RANK = {"nearest": (3, 4, 5), "nearest-exact": (3, 4, 5), "linear": (3,), "bilinear": (4,),
                  "bicubic": (4,), "trilinear": (5,)}


def interpolate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``F.interpolate`` to an explicit ``size`` (a 5 ms Python decomposition on meta for bilinear): the output
    is ``(N, C, *size)``. Declined: a scale factor (its rounding), ``area`` (adaptive pooling), antialiasing,
    ``align_corners`` where the mode rejects it, dtypes other than float32/float64, and layouts the kernel
    would keep (a channels-last input)."""
    if len(args) > len(_INTERPOLATE_ARGS) or set(kwargs) - set(_INTERPOLATE_ARGS[len(args):]):
        return None
    a = {**dict(zip(_INTERPOLATE_ARGS, args, strict=False)), **kwargs}
    x, size, mode = a.get("input"), a.get("size"), a.get("mode", "nearest")
    if not dense(x) or x.dtype not in (torch.float32, torch.float64) or 0 in x.shape:
        return None
    if not isinstance(mode, str) or mode not in _RESAMPLE_RANK or x.dim() not in _RESAMPLE_RANK[mode]:
        return None
    if a.get("scale_factor") is not None or a.get("recompute_scale_factor") is not None or a.get("antialias", False):
        return None
    corners = a.get("align_corners")
    if not (corners is None or (isinstance(corners, bool) and mode in ("linear", "bilinear", "bicubic", "trilinear"))):
        return None
    n = x.dim() - 2
    sizes = (size,) * n if type(size) is int else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(sizes) != n or not all(type(v) is int and v > 0 for v in sizes):
        return None
    if _ambiguous_layout(x, n):
        return None
    return torch.empty((*x.shape[:2], *sizes), dtype=x.dtype, device="meta")


OP_ARITH, OP_DIV = _binary(False, tensor_first=False), _binary(True, tensor_first=False)  # operator.add, ...
ARITH, DIV = _binary(False, tensor_first=True), _binary(True, tensor_first=True)  # torch.add, Tensor.add, ...


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """From the weight's shape, not the ``in_features`` attribute: after a rewrite the two must agree, and
    the kernel is what checks it."""
    w, b = mod.weight, mod.bias
    if not dense(w) or w.dim() != 2 or x.dim() == 0 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        return None  # the kernel gives the error the user would see
    if b is not None and (b.shape != (w.shape[0],) or b.dtype != w.dtype):
        return None
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device="meta")


def adaptive_pool(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    n = 1 if isinstance(mod, nn.AdaptiveAvgPool1d) else 2 if isinstance(mod, nn.AdaptiveAvgPool2d) else 3
    size = mod.output_size
    size = (size,) * n if isinstance(size, int) else tuple(size)
    if x.dim() not in (n + 1, n + 2) or len(size) != n or not x.dtype.is_floating_point or 0 in x.shape[-n:]:
        return None
    out = tuple(x.shape[-n + i] if s is None else s for i, s in enumerate(size))
    return torch.empty((*x.shape[:-n], *out), dtype=x.dtype, device="meta")


def conv(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``nn.Conv{1,2,3}d`` with zero padding: the output size formula, from the weight's shape.

    Only where the kernel's output layout is certainly contiguous: a contiguous input that is not also
    channels-last-contiguous (on meta the input alone picks the output layout; an ambiguous input such as
    ``[1, C, 1, 1]`` is left to the kernel).
    """
    w, b = mod.weight, mod.bias
    n = w.dim() - 2
    if mod.padding_mode != "zeros" or not dense(w) or x.dim() not in (n + 1, n + 2) or x.dtype != w.dtype:
        return None
    if _ambiguous_layout(x, n):
        return None
    groups = mod.groups
    channels = x.shape[-n - 1]
    if channels != w.shape[1] * groups or w.shape[0] % groups or (b is not None and b.shape != (w.shape[0],)):
        return None  # the kernel names the mismatch
    stride, dilation = tuple(mod.stride), tuple(mod.dilation)
    if isinstance(mod.padding, str):
        if mod.padding == "same" and any(s != 1 for s in stride):
            return None
        pad = (0,) * n if mod.padding == "valid" else None
    else:
        pad = tuple(mod.padding)
    spatial = []
    for i in range(n):
        size, k = x.shape[-n + i], w.shape[2 + i]
        out = size if pad is None else (size + 2 * pad[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
        if out <= 0 or size <= 0:
            return None  # the kernel raises
        spatial.append(out)
    return torch.empty((*x.shape[: -n - 1], w.shape[0], *spatial), dtype=x.dtype, device="meta")
