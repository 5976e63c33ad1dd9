"""Channel rules for ``call_function`` and ``call_method`` nodes: one entry per op."""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.rules.common import (
    broadcast,
    call_arg,
    no_channels,
    pin_all,
    pooling_like,
    reshape_like,
    tensor_io,
    unary,
    values_of,
)
from fxprune.rules.context import RuleContext

Rule = Callable[[fx.Node, RuleContext], None]


def cat(node: fx.Node, ctx: RuleContext) -> None:
    """torch.cat: the cat dim of the output is the inputs laid end to end; other dims are shared."""
    y = ctx.out()
    tensors = call_arg(node, 0, "tensors")
    if y is None or not isinstance(tensors, (list, tuple)):
        pin_all(node, ctx, f"{node.name}: cat of a non-list")
        return
    dim = int(call_arg(node, 1, "dim", 0)) % ctx.ndim(y)  # type: ignore[arg-type]
    offset = 0
    for t in tensors:
        x = ctx.tensor(t)
        if x is None:
            pin_all(node, ctx, f"{node.name}: cat of a non-tensor")
            return
        n = ctx.shape_of(x)[dim]
        if n:
            idx = np.arange(n)
            ctx.mapped(x, dim, idx, y, dim, offset + idx)
        for d in range(ctx.ndim(y)):
            if d != dim:
                ctx.same(x, d, y, d)
        offset += n


def stack(node: fx.Node, ctx: RuleContext) -> None:
    """torch.stack: a new dim is inserted; every other dim is shared by all inputs."""
    y = ctx.out()
    tensors = call_arg(node, 0, "tensors")
    if y is None or not isinstance(tensors, (list, tuple)):
        pin_all(node, ctx, f"{node.name}: stack of a non-list")
        return
    dim = int(call_arg(node, 1, "dim", 0)) % ctx.ndim(y)  # type: ignore[arg-type]
    ctx.pin(y, f"{node.name}: stacked dim", [dim])
    for t in tensors:
        x = ctx.tensor(t)
        if x is None:
            pin_all(node, ctx, f"{node.name}: stack of a non-tensor")
            return
        for d in range(ctx.ndim(x)):
            ctx.same(x, d, y, d if d < dim else d + 1)


def split(node: fx.Node, ctx: RuleContext) -> None:
    """split/chunk: output ``i`` is a slice of the split dim at its offset; other dims are shared."""
    x = ctx.tensor(node.args[0]) if node.args else None
    parts = values_of(node, ctx)
    if x is None or not parts:
        pin_all(node, ctx, f"{node.name}: split of a non-tensor")
        return
    dim = int(call_arg(node, 2, "dim", 0)) % ctx.ndim(x)  # type: ignore[arg-type]
    offset = 0
    for p in parts:
        n = ctx.shape_of(p)[dim]
        if n:
            idx = np.arange(n)
            ctx.mapped(x, dim, offset + idx, p, dim, idx)
        for d in range(ctx.ndim(x)):
            if d != dim:
                ctx.same(x, d, p, d)
        offset += n


def getitem(node: fx.Node, ctx: RuleContext) -> None:
    """``a[i]`` on a tuple output, or basic indexing of a tensor (full slices pass through)."""
    src, idx = node.args[0], node.args[1]
    if not isinstance(src, fx.Node):
        return
    y = ctx.out()
    parts = values_of(src, ctx)
    if isinstance(idx, int) and parts and parts[0] != src.name:
        part = parts[idx]
        if y is not None:
            for d in range(ctx.ndim(y)):
                ctx.same(part, d, y, d)
        return
    x = ctx.tensor(src)
    if x is None:
        if y is not None:  # a tensor picked out of an untracked container
            ctx.pin(y, f"{node.name}: item of an untracked container")
        return
    if y is None:
        pin_all(node, ctx, f"{node.name}: tensor indexing with a non-tensor result")
        return
    _index_tensor(node, ctx, x, y, idx)


def _gather_rows(node: fx.Node, ctx: RuleContext, x: str, y: str, items: list[object]) -> bool:
    """``x[:, ..., idx]`` with one index tensor after full slices only: the dims around it pass through.

    Output dims are x's dims before ``k``, then the index's dims, then x's dims after ``k`` (a relative
    position bias table gathered by an index buffer keeps its heads dim). Returns False when not that form.
    """
    k = len(items) - 1
    index = ctx.tensor(items[k]) if isinstance(items[k], fx.Node) else None
    if index is None or any(i != slice(None) for i in items[:k]):
        return False
    n_idx = ctx.ndim(index)
    if ctx.ndim(y) != ctx.ndim(x) - 1 + n_idx:
        return False
    reason = f"{node.name}: rows gathered by an index tensor"
    for d in range(ctx.ndim(x)):
        if d < k:
            ctx.same(x, d, y, d)
        elif d == k:
            ctx.pin(x, reason, [d])
        else:
            ctx.same(x, d, y, d - 1 + n_idx)
    ctx.pin(y, reason, list(range(k, k + n_idx)))
    ctx.pin(index, reason)
    return True


def _index_tensor(node: fx.Node, ctx: RuleContext, x: str, y: str, idx: object) -> None:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        if not _gather_rows(node, ctx, x, y, items):
            pin_all(node, ctx, f"{node.name}: advanced indexing")
        return
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (ctx.ndim(x) - n_real) + items[k + 1 :]
    items += [slice(None)] * (ctx.ndim(x) - sum(1 for i in items if i is not None))
    xd = yd = 0
    for i in items:
        if i is None:
            yd += 1
        elif isinstance(i, slice) and i == slice(None):
            ctx.same(x, xd, y, yd)
            xd += 1
            yd += 1
        elif isinstance(i, slice):
            _slice_dim(node, ctx, (x, xd), (y, yd), i)
            xd += 1
            yd += 1
        else:
            ctx.pin(x, f"{node.name}: integer index", [xd])
            xd += 1


def slice_range(s: slice, size: int) -> tuple[int, int] | None:
    """``[start, stop)`` that slice ``s`` reads of a dim of ``size``; None unless its step is 1 and its bounds
    are ints or None (negative bounds count from the end, out-of-range bounds are clipped)."""
    if s.step not in (None, 1) or any(b is not None and type(b) is not int for b in (s.start, s.stop)):
        return None
    start, stop, _ = slice(s.start, s.stop).indices(size)
    return start, max(start, stop)


def _slice_dim(node: fx.Node, ctx: RuleContext, xs: tuple[str, int], ys: tuple[str, int], s: slice) -> None:
    """``x[..., a:b]`` along one dim: output index ``j`` is input index ``a + j`` (a fused qkv projection
    sliced into q, k and v); the rest of ``x`` is not read here. Other steps and computed bounds pin."""
    (x, xd), (y, yd) = xs, ys
    n, size = ctx.shape_of(y)[yd], ctx.shape_of(x)[xd]
    bounds = slice_range(s, size)
    if bounds is None or bounds[1] - bounds[0] != n:
        ctx.pin(x, f"{node.name}: partial slice {s}", [xd])
        ctx.pin(y, f"{node.name}: partial slice {s}", [yd])
    elif n == size:
        ctx.same(x, xd, y, yd)
    elif n:
        idx = np.arange(n)
        ctx.mapped(x, xd, bounds[0] + idx, y, yd, idx)


def permute(node: fx.Node, ctx: RuleContext) -> None:
    """permute/transpose/t: output dim ``i`` is input dim ``perm[i]``."""
    io = tensor_io(node, ctx, "permute of a non-tensor")
    if io is None:
        return
    x, y = io
    n = ctx.ndim(x)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("transpose", "swapaxes", "swapdims"):
        d0 = int(call_arg(node, 1, "dim0")) % n  # type: ignore[arg-type]
        d1 = int(call_arg(node, 2, "dim1")) % n  # type: ignore[arg-type]
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif name == "t":
        perm = list(range(n))[::-1]
    else:
        rest = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
        perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        perm = [int(p) % n for p in perm]  # type: ignore[arg-type]
    for i, p in enumerate(perm):
        ctx.same(x, p, y, i)


def reduction(keeps_exact: bool) -> Rule:
    """sum (exact under zeroed channels) or mean/amax/var (divisor or statistic changes: reduced dims pinned)."""

    def rule(node: fx.Node, ctx: RuleContext) -> None:
        io = tensor_io(node, ctx, "reduction without a single tensor result")
        if io is None:
            return
        x, y = io
        n = ctx.ndim(x)
        dims = call_arg(node, 1, "dim")
        if dims is None:
            reduced = list(range(n))
        else:
            reduced = [int(d) % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])]  # type: ignore[arg-type]
        keepdim = bool(call_arg(node, 2, "keepdim", False))
        yd = 0
        for d in range(n):
            if d in reduced:
                if not keeps_exact:
                    ctx.pin(x, f"{node.name}: reduced by {node.target}", [d])
                if keepdim:
                    yd += 1
            else:
                ctx.same(x, d, y, yd)
                yd += 1

    rule.__doc__ = "Reduction over dims: kept dims pass through."
    return rule


def softmax(node: fx.Node, ctx: RuleContext) -> None:
    """softmax/log_softmax: shape-preserving, but the normalised dim is pinned."""
    unary(node, ctx)
    x = ctx.tensor(node.args[0]) if node.args else None
    dim = call_arg(node, 1, "dim")
    if x is not None and isinstance(dim, int):
        ctx.pin(x, f"{node.name}: softmax normalises over this dim", [dim % ctx.ndim(x)])
    elif x is not None:
        pin_all(node, ctx, f"{node.name}: softmax without a literal dim")


def pool_fn(n_spatial: int) -> Rule:
    """Functional pooling / interpolation over ``n_spatial`` trailing dims."""

    def rule(node: fx.Node, ctx: RuleContext) -> None:
        io = tensor_io(node, ctx, "pooling without a single tensor result")
        if io is None:
            return
        x, y = io
        pooling_like(ctx, x, y, n_spatial, node.name)

    return rule


def interpolate(node: fx.Node, ctx: RuleContext) -> None:
    """F.interpolate: resamples every dim after the channel dim."""
    io = tensor_io(node, ctx, "interpolate without a tensor")
    if io is None:
        return
    x, y = io
    pooling_like(ctx, x, y, ctx.ndim(x) - 2, node.name)


_ELEMENTWISE_FNS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.true_divide, torch.rsub, torch.masked_fill, torch.pow, operator.pow, operator.floordiv,
    operator.mod,
]
_UNARY_FNS = [
    torch.relu, torch.relu_, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid,
    torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus, F.hardtanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, torch.exp,
    torch.neg, operator.neg, torch.abs, torch.sqrt, torch.rsqrt, torch.square,
    torch.clone, torch.erf, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    torch.nn.functional.logsigmoid, torch.nan_to_num, torch.sign,
]
_ELEMENTWISE_METHODS = [
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "truediv", "masked_fill", "masked_fill_",
    "where", "maximum", "minimum", "type_as", "pow", "rsub",
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "contiguous",
    "float", "double", "half", "bfloat16", "to", "exp", "neg", "abs", "sqrt", "rsqrt", "clone", "detach",
    "square", "zero_", "fill_", "erf", "sign", "hardtanh",
]

FUNCTION_RULES: dict[object, Rule] = {
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat,
    torch.stack: stack,
    torch.split: split, torch.chunk: split,
    operator.getitem: getitem,
    torch.flatten: reshape_like, torch.reshape: reshape_like, torch.squeeze: reshape_like,
    torch.unsqueeze: reshape_like,
    torch.permute: permute, torch.transpose: permute, torch.swapaxes: permute, torch.t: permute,
    torch.sum: reduction(True), torch.mean: reduction(False), torch.amax: reduction(False),
    torch.amin: reduction(False),
    F.softmax: softmax, torch.softmax: softmax, F.log_softmax: softmax, torch.log_softmax: softmax,
    F.max_pool1d: pool_fn(1), F.avg_pool1d: pool_fn(1), F.adaptive_avg_pool1d: pool_fn(1),
    F.adaptive_max_pool1d: pool_fn(1),
    F.max_pool2d: pool_fn(2), F.avg_pool2d: pool_fn(2), F.adaptive_avg_pool2d: pool_fn(2),
    F.adaptive_max_pool2d: pool_fn(2),
    F.max_pool3d: pool_fn(3), F.avg_pool3d: pool_fn(3), F.adaptive_avg_pool3d: pool_fn(3),
    F.interpolate: interpolate, F.upsample: interpolate,
    getattr: no_channels, len: no_channels,
}
FUNCTION_RULES.update({f: broadcast for f in _ELEMENTWISE_FNS})
FUNCTION_RULES.update({f: unary for f in _UNARY_FNS})

METHOD_RULES: dict[str, Rule] = {
    "view": reshape_like, "reshape": reshape_like, "flatten": reshape_like, "squeeze": reshape_like,
    "unsqueeze": reshape_like, "view_as": reshape_like, "reshape_as": reshape_like,
    "permute": permute, "transpose": permute, "swapaxes": permute, "t": permute,
    "split": split, "chunk": split,
    "sum": reduction(True), "mean": reduction(False), "amax": reduction(False), "amin": reduction(False),
    "softmax": softmax, "log_softmax": softmax,
    "size": no_channels, "dim": no_channels, "numel": no_channels, "ndimension": no_channels,
}
METHOD_RULES.update({m: broadcast for m in _ELEMENTWISE_METHODS})
METHOD_RULES.update({m: unary for m in _UNARY_METHODS})


def roll(node: fx.Node, ctx: RuleContext) -> None:
    """torch.roll: rolled dims are permuted (pinned), every other dim passes through (Swin's shifted windows)."""
    x = ctx.tensor(node.args[0]) if node.args else None
    y = ctx.out()
    dims = call_arg(node, 2, "dims")
    if x is None or y is None or dims is None:
        pin_all(node, ctx, f"{node.name}: roll without explicit dims")
        return
    rolled = {int(d) % ctx.ndim(x) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}  # type: ignore[union-attr]
    for d in range(ctx.ndim(x)):
        if d in rolled:
            ctx.pin(x, f"{node.name}: rolled dim", [d])
            ctx.pin(y, f"{node.name}: rolled dim", [d])
        else:
            ctx.same(x, d, y, d)


def pixel_shuffle(unshuffle: bool) -> Rule:
    """F.pixel_shuffle(x, r): input channel k becomes output channel k // r**2 (unshuffle: the reverse)."""

    def rule(node: fx.Node, ctx: RuleContext) -> None:
        x = ctx.tensor(node.args[0]) if node.args else None
        y = ctx.out()
        if x is None or y is None or ctx.ndim(x) < 3:
            pin_all(node, ctx, f"{node.name}: pixel shuffle of an unexpected tensor")
            return
        cd = ctx.ndim(x) - 3
        for d in range(cd):
            ctx.same(x, d, y, d)
        wide, narrow = (y, x) if unshuffle else (x, y)
        k = np.arange(ctx.shape_of(wide)[cd])
        factor = ctx.shape_of(wide)[cd] // ctx.shape_of(narrow)[cd]
        ctx.mapped(wide, cd, k, narrow, cd, k // factor)
        ctx.pin(x, f"{node.name}: spatial dims", [cd + 1, cd + 2])

    rule.__doc__ = pixel_shuffle.__doc__
    return rule


FUNCTION_RULES.update({torch.roll: roll, F.pixel_shuffle: pixel_shuffle(False), F.pixel_unshuffle: pixel_shuffle(True),
                       torch.pixel_shuffle: pixel_shuffle(False), torch.pixel_unshuffle: pixel_shuffle(True)})
METHOD_RULES["roll"] = roll


def _optional_rules() -> None:
    """Rules for wrapped functions of optional packages, registered when the package is installed."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is optional
        return
    # Stochastic depth scales whole samples (or the whole batch) by a 0/1 noise: every dim passes through.
    FUNCTION_RULES[stochastic_depth] = unary


_optional_rules()
