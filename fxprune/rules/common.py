"""Building blocks shared by the op rules: broadcasting, channel-wise ops, reshapes and pinning."""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from fxprune.rules.context import RuleContext, node_tensor_args


def call_arg(node: fx.Node, pos: int, name: str, default: object = None) -> object:
    """Argument ``name`` of a call node, given by position ``pos`` or by keyword."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def node_values(node: fx.Node, shapes: Mapping[str, object]) -> list[str]:
    """The tensor values a node produces: itself, or ``name#i`` for each tensor of a tuple output."""
    if node.name in shapes:
        return [node.name]
    out: list[str] = []
    while f"{node.name}#{len(out)}" in shapes:
        out.append(f"{node.name}#{len(out)}")
    return out


def values_of(node: fx.Node, ctx: RuleContext) -> list[str]:
    """``node_values`` for a rule."""
    return node_values(node, ctx.value_shapes)


def pin_all(node: fx.Node, ctx: RuleContext, reason: str) -> None:
    """Pin every dim of every tensor the node reads or writes."""
    for arg in node_tensor_args(node):
        for v in values_of(arg, ctx):
            ctx.pin(v, reason)
    for v in values_of(node, ctx):
        ctx.pin(v, reason)


def tensor_io(node: fx.Node, ctx: RuleContext, what: str) -> tuple[str, str] | None:
    """The value names of ``node``'s first tensor argument and of its single tensor result; None, with every
    dim pinned ("<node>: <what>"), when either is missing."""
    x = ctx.tensor(node.args[0]) if node.args else None
    y = ctx.out()
    if x is None or y is None:
        pin_all(node, ctx, f"{node.name}: {what}")
        return None
    return x, y


def broadcast(node: fx.Node, ctx: RuleContext) -> None:
    """Elementwise op with numpy broadcasting: aligned dims of equal size are coupled, size-1 dims are not."""
    y = ctx.out()
    if y is None:
        return
    ys = ctx.shape_of(y)
    for arg in node_tensor_args(node):
        x = ctx.tensor(arg)
        if x is None:
            continue
        xs = ctx.shape_of(x)
        if len(xs) > len(ys):
            pin_all(node, ctx, f"{node.name}: input of higher rank than its output")
            return
        for i, size in enumerate(xs):
            od = len(ys) - len(xs) + i
            if size == ys[od]:
                ctx.same(x, i, y, od)


def unary(node: fx.Node, ctx: RuleContext) -> None:
    """Shape-preserving op on its first input (activations, dropout, clone): every dim is coupled."""
    y = ctx.out()
    x = ctx.tensor(node.args[0]) if node.args else None
    if y is None or x is None:
        return
    if ctx.shape_of(x) != ctx.shape_of(y):
        pin_all(node, ctx, f"{node.name}: expected a shape-preserving op")
        return
    for d in range(ctx.ndim(y)):
        ctx.same(x, d, y, d)


def no_channels(node: fx.Node, ctx: RuleContext) -> None:
    """Ops that read metadata only (size, dim, shape): no coupling and nothing to pin."""


def pooling_like(ctx: RuleContext, x: str, y: str, n_spatial: int, what: str) -> None:
    """Pooling-like op: leading (batch, channel) dims pass through, the last ``n_spatial`` dims are new."""
    lead = ctx.ndim(x) - n_spatial
    if lead < 0 or ctx.ndim(y) != ctx.ndim(x):
        assert ctx.node is not None
        pin_all(ctx.node, ctx, f"{what}: unexpected rank")
        return
    for d in range(lead):
        ctx.same(x, d, y, d)
    ctx.pin(x, f"{what} reads spatial dims, which are never pruned", list(range(lead, ctx.ndim(x))))


def match_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair groups of input dims with groups of output dims of equal product (size-1 dims skipped).

    Returns None when the shapes cannot be matched (a reshape that interleaves dims).
    """
    ii = [d for d, s in enumerate(in_shape) if s != 1]
    jj = [d for d, s in enumerate(out_shape) if s != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ii) and j < len(jj):
        dims_in, dims_out = [ii[i]], [jj[j]]
        pi, pj = in_shape[ii[i]], out_shape[jj[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(ii):
                    return None
                dims_in.append(ii[i])
                pi *= in_shape[ii[i]]
                i += 1
            else:
                if j >= len(jj):
                    return None
                dims_out.append(jj[j])
                pj *= out_shape[jj[j]]
                j += 1
        groups.append((dims_in, dims_out))
    if i != len(ii) or j != len(jj):
        return None
    return groups


def reshape_like(node: fx.Node, ctx: RuleContext) -> None:
    """view/reshape/flatten/squeeze/unsqueeze: couple dims by matching products of sizes.

    A one-to-one dim is coupled index by index. A merge (flatten) or split (heads, channel shuffle) is
    deferred as a ``Regroup`` so the dependency pass can pick the one factor that carries channels.
    """
    y = ctx.out()
    x = ctx.tensor(node.args[0]) if node.args else None
    if y is None or x is None:
        pin_all(node, ctx, f"{node.name}: reshape of a non-tensor")
        return
    groups = match_reshape(ctx.shape_of(x), ctx.shape_of(y))
    if groups is None:
        pin_all(node, ctx, f"{node.name}: reshape {ctx.shape_of(x)} -> {ctx.shape_of(y)} interleaves dims")
        return
    for dims_in, dims_out in groups:
        if len(dims_in) == 1 and len(dims_out) == 1:
            ctx.same(x, dims_in[0], y, dims_out[0])
        elif len(dims_in) == 1:
            ctx.regroup(ctx.space(x, dims_in[0]), [ctx.space(y, d) for d in dims_out])
        elif len(dims_out) == 1:
            ctx.regroup(ctx.space(y, dims_out[0]), [ctx.space(x, d) for d in dims_in])
        else:
            reason = f"{node.name}: reshape regroups several dims into several dims"
            ctx.pin(x, reason, dims_in)
            ctx.pin(y, reason, dims_out)


def linear_couplings(ctx: RuleContext, x: str, y: str, w: str, b: str | None) -> None:
    """y = x @ w.T + b: leading dims pass through, in-features are w's dim 1, out-features w's dim 0 and b."""
    for d in range(ctx.ndim(x) - 1):
        ctx.same(x, d, y, d)
    ctx.same(x, -1, w, 1)
    ctx.same(y, -1, w, 0)
    if b is not None:
        ctx.same(w, 0, b, 0)
