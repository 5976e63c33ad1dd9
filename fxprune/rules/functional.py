"""Channel rules for functional layers whose weights arrive as graph values (get_attr nodes).

Modules that call ``F.layer_norm(x, self.normalized_shape, self.weight, ...)`` in their own forward (timm's
LayerNorm, many custom blocks) are traced through, so their parameters are ``get_attr`` nodes feeding a
``call_function``; these rules couple them the same way the module rules do.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.passes.base import submodule
from fxprune.rules.common import call_arg, linear_couplings, pin_all, unary
from fxprune.rules.context import RuleContext


def layer_norm(node: fx.Node, ctx: RuleContext) -> None:
    """F.layer_norm(x, normalized_shape, weight, bias) and F.rms_norm(x, normalized_shape, weight): weight/bias
    follow the normalised dims; the oracle's reference normalises over the kept channels (``verify.norm_spec``)."""
    params = ((2, "weight"), (3, "bias")) if node.target in (F.layer_norm, torch.layer_norm) else ((2, "weight"),)
    x = ctx.tensor(node.args[0]) if node.args else None
    shape = call_arg(node, 1, "normalized_shape")
    if x is None or not isinstance(shape, (list, tuple)):
        pin_all(node, ctx, f"{node.name}: layer_norm with a computed shape")
        return
    unary(node, ctx)
    k = len(shape)
    for j in range(k):
        d = ctx.ndim(x) - k + j
        for pos, name in params:
            p = ctx.tensor(call_arg(node, pos, name))
            if p is not None:
                ctx.same(x, d, p, j)
    if k > 1:
        ctx.pin(x, f"{node.name}: layer_norm over several dims", list(range(ctx.ndim(x) - k, ctx.ndim(x) - 1)))


def linear(node: fx.Node, ctx: RuleContext) -> None:
    """F.linear(x, weight, bias): like nn.Linear with the weight as a value."""
    x = ctx.tensor(node.args[0]) if node.args else None
    w = ctx.tensor(call_arg(node, 1, "weight"))
    b = ctx.tensor(call_arg(node, 2, "bias"))
    y = ctx.out()
    if x is None or w is None or y is None or ctx.ndim(w) != 2:
        pin_all(node, ctx, f"{node.name}: F.linear with unexpected arguments")
        return
    linear_couplings(ctx, x, y, w, b)
    _produce_param(call_arg(node, 1, "weight"), ctx, 0)


def addmm(node: fx.Node, ctx: RuleContext) -> None:
    """torch.addmm(bias, x, w) = bias + x @ w with w [in, out] (Hugging Face Conv1D)."""
    b, x, w = (ctx.tensor(a) for a in node.args[:3]) if len(node.args) >= 3 else (None, None, None)
    y = ctx.out()
    if x is None or w is None or y is None or ctx.ndim(x) != 2 or ctx.ndim(w) != 2:
        pin_all(node, ctx, f"{node.name}: addmm with unexpected arguments")
        return
    ctx.same(x, 0, y, 0)
    ctx.same(x, 1, w, 0)
    ctx.same(y, 1, w, 1)
    if b is not None and ctx.ndim(b) == 1:
        ctx.same(w, 1, b, 0)
    elif b is not None:
        pin_all(node, ctx, f"{node.name}: addmm with a 2-D bias")
        return
    _produce_param(node.args[2], ctx, 1)


def _produce_param(arg: object, ctx: RuleContext, dim: int) -> None:
    """A weight fed through a get_attr node produces channels along ``dim`` of its parameter."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        owner, _, attr = str(arg.target).rpartition(".")
        p = ctx.param(submodule(ctx.gm, owner), attr)
        if p is not None:
            ctx.produce(p, dim)


def batch_norm(node: fx.Node, ctx: RuleContext) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): per-channel values follow dim 1."""
    x = ctx.tensor(node.args[0]) if node.args else None
    if x is None or ctx.out() is None:
        pin_all(node, ctx, f"{node.name}: batch_norm with unexpected arguments")
        return
    unary(node, ctx)
    for pos, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = ctx.tensor(call_arg(node, pos, name))
        if p is not None:
            ctx.same(x, 1, p, 0)


def group_norm(node: fx.Node, ctx: RuleContext) -> None:
    """F.group_norm(x, G, weight, bias): as nn.GroupNorm (same positions lost in every group)."""
    x = ctx.tensor(node.args[0]) if node.args else None
    groups = call_arg(node, 1, "num_groups")
    params = [p for p in (ctx.tensor(call_arg(node, 2, "weight")), ctx.tensor(call_arg(node, 3, "bias"))) if p]
    if x is None or not isinstance(groups, int) or not params or ctx.ndim(x) < 2:
        pin_all(node, ctx, f"{node.name}: group_norm without affine parameters or a literal group count")
        return
    unary(node, ctx)
    for p in params:
        ctx.same(x, 1, p, 0)
    c = ctx.shape_of(x)[1]
    if groups > 1:
        idx = np.arange(c)
        ctx.mapped(params[0], 0, idx, params[0], 0, idx % (c // groups))


def embedding(node: fx.Node, ctx: RuleContext) -> None:
    """F.embedding(idx, weight): the embedding dim is produced by the table."""
    idx = ctx.tensor(node.args[0]) if node.args else None
    w = ctx.tensor(call_arg(node, 1, "weight"))
    y = ctx.out()
    if idx is None or w is None or y is None:
        pin_all(node, ctx, f"{node.name}: embedding with unexpected arguments")
        return
    for d in range(ctx.ndim(idx)):
        ctx.same(idx, d, y, d)
    ctx.same(y, -1, w, 1)
    ctx.pin(w, f"{node.name}: vocabulary rows", [0])
    if call_arg(node, 3, "max_norm") is not None:  # the renorm's row norms span the embedding dim
        ctx.pin(w, f"{node.name}: embedding(max_norm=...) renormalises rows over the embedding dim", [1])
    _produce_param(call_arg(node, 1, "weight"), ctx, 1)


def padded_dims(pad: object, ndim: int) -> list[bool] | None:
    """Per dim, whether ``F.pad``'s ``pad`` may change it (amounts are given last dim first, two per dim).

    A dim counts as unpadded only when both its amounts are the literal 0; None when ``pad`` is not a
    list or tuple.
    """
    if not isinstance(pad, (list, tuple)):
        return None
    out = [False] * ndim
    for i in range(0, len(pad), 2):
        d = ndim - 1 - i // 2
        if 0 <= d < ndim:
            out[d] = any(not isinstance(a, int) or a != 0 for a in pad[i : i + 2])
    return out


def pad(node: fx.Node, ctx: RuleContext) -> None:
    """F.pad: unpadded dims pass through (Swin pads H and W of a channels-last map); padded dims are pinned."""
    x = ctx.tensor(node.args[0]) if node.args else None
    y = ctx.out()
    padded = padded_dims(call_arg(node, 1, "pad"), ctx.ndim(x)) if x is not None else None
    if x is None or y is None or padded is None:
        pin_all(node, ctx, f"{node.name}: pad without a literal pad list")
        return
    for d, is_padded in enumerate(padded):
        if is_padded:
            ctx.pin(x, f"{node.name}: padded dim", [d])
            ctx.pin(y, f"{node.name}: padded dim", [d])
        else:
            ctx.same(x, d, y, d)


FUNCTIONS = {
    F.pad: pad, torch._C._nn.pad: pad,
    F.layer_norm: layer_norm, torch.layer_norm: layer_norm, F.rms_norm: layer_norm, torch.rms_norm: layer_norm,
    F.linear: linear, torch._C._nn.linear: linear,
    F.batch_norm: batch_norm, torch.batch_norm: batch_norm,
    F.group_norm: group_norm, torch.group_norm: group_norm,
    F.embedding: embedding,
    torch.addmm: addmm,
}
