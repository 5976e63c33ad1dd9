"""Channel rules for contractions and attention: matmul/bmm, einsum, scaled dot-product attention, unbind.

A contraction couples the contracted dims of both operands (removing index k removes only zero terms,
so it is exact) and passes every other dim through to the output.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.rules.common import pin_all, tensor_io, values_of
from fxprune.rules.context import RuleContext


def _tensors(node: fx.Node, ctx: RuleContext, n: int) -> list[str] | None:
    out = []
    for i in range(n):
        a = node.args[i] if len(node.args) > i else None
        v = ctx.tensor(a)
        if v is None:
            return None
        out.append(v)
    return out


def _batch_dims(ctx: RuleContext, operands: list[str], y: str, n_core: int) -> None:
    """Couple the broadcast batch dims (all but the last ``n_core``) of each operand with the output."""
    ys = ctx.shape_of(y)
    nb_out = len(ys) - n_core
    for v in operands:
        s = ctx.shape_of(v)
        nb = len(s) - n_core
        for i in range(nb):
            od = nb_out - nb + i
            if od >= 0 and s[i] == ys[od]:
                ctx.same(v, i, y, od)


def matmul(node: fx.Node, ctx: RuleContext) -> None:
    """a [..., n, k] @ b [..., k, m] -> [..., n, m]: k is contracted, n and m pass through."""
    ops = _tensors(node, ctx, 2)
    y = ctx.out()
    if ops is None or y is None or min(ctx.ndim(ops[0]), ctx.ndim(ops[1])) < 2:
        pin_all(node, ctx, f"{node.name}: matmul with a vector or a non-tensor")
        return
    a, b = ops
    ctx.same(a, -1, b, -2)
    ctx.same(a, -2, y, -2)
    ctx.same(b, -1, y, -1)
    _batch_dims(ctx, [a, b], y, 2)


def einsum(node: fx.Node, ctx: RuleContext) -> None:
    """torch.einsum: every occurrence of one subscript letter is the same dim."""
    eq = node.args[0] if node.args else None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    vals = [ctx.tensor(o) for o in operands]
    y = ctx.out()
    if not isinstance(eq, str) or "." in eq or y is None or any(v is None for v in vals) or "->" not in eq:
        pin_all(node, ctx, f"{node.name}: einsum without an explicit '->' equation")
        return
    lhs, rhs = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    first: dict[str, tuple[str, int]] = {}
    for v, letters in zip(vals, subs, strict=True):
        assert v is not None
        for d, ch in enumerate(letters):
            if ch in first:
                if ctx.shape_of(first[ch][0])[first[ch][1]] == ctx.shape_of(v)[d]:
                    ctx.same(first[ch][0], first[ch][1], v, d)
            else:
                first[ch] = (v, d)
    for d, ch in enumerate(rhs):
        if ch in first:
            ctx.same(first[ch][0], first[ch][1], y, d)


def sdpa(node: fx.Node, ctx: RuleContext) -> None:
    """F.scaled_dot_product_attention(q, k, v): q/k share E, k/v share S, v/out share Ev, q/out share L.

    The default scale depends on E; the literal rewriter pins it to the original value so pruning E
    keeps the function.
    """
    ops = _tensors(node, ctx, 3)
    y = ctx.out()
    if ops is None or y is None:
        pin_all(node, ctx, f"{node.name}: attention with non-tensor q/k/v")
        return
    q, k, v = ops
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    m = ctx.tensor(mask)
    ctx.same(q, -1, k, -1)
    ctx.same(v, -1, y, -1)
    ctx.same(k, -2, v, -2)
    ctx.same(q, -2, y, -2)
    _batch_dims(ctx, [q, k, v], y, 2)
    _gqa_heads(ctx, q, [k, v])
    if m is not None:
        ctx.pin(m, f"{node.name}: attention mask")
    ctx.pin(q, f"{node.name}: attention tokens", [ctx.ndim(q) - 2])
    ctx.pin(k, f"{node.name}: attention tokens", [ctx.ndim(k) - 2])


def _gqa_heads(ctx: RuleContext, q: str, kv: list[str]) -> None:
    """Grouped-query attention inside the kernel (``enable_gqa=True``): q holds ``rep`` heads per key/value
    head, so query head h is coupled with key/value head h // rep (a key/value head and its query heads are
    one channel class: removing it removes them together). With ``prune_heads="query"`` every key/value head
    stays and query head h is coupled with query head h % rep of every group instead, so each group loses
    the same query heads and the kernel's grouping stays valid."""
    qs = ctx.shape_of(q)
    if len(qs) < 3:
        return
    hq = qs[-3]
    for t in kv:
        ts = ctx.shape_of(t)
        if len(ts) < 3 or ts[-3] == hq or ts[-3] <= 0 or hq % ts[-3]:
            continue
        index = np.arange(hq, dtype=np.int64)
        rep = hq // ts[-3]
        if ctx.query_heads:
            ctx.pin(t, "prune_heads='query' keeps every key/value head", [ctx.ndim(t) - 3])
            ctx.mapped(q, ctx.ndim(q) - 3, index, q, ctx.ndim(q) - 3, index % rep)
        else:
            ctx.mapped(q, ctx.ndim(q) - 3, index, t, ctx.ndim(t) - 3, index // rep)


def unbind(node: fx.Node, ctx: RuleContext) -> None:
    """x.unbind(dim): output i is x without ``dim``; the unbound dim is pinned."""
    x = ctx.tensor(node.args[0]) if node.args else None
    parts = values_of(node, ctx)
    if x is None or not parts:
        pin_all(node, ctx, f"{node.name}: unbind of a non-tensor")
        return
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = int(dim) % ctx.ndim(x)  # type: ignore[arg-type]
    ctx.pin(x, f"{node.name}: unbound dim", [dim])
    for p in parts:
        for d in range(ctx.ndim(x)):
            if d != dim:
                ctx.same(x, d, p, d if d < dim else d - 1)


def expand(node: fx.Node, ctx: RuleContext) -> None:
    """x.expand(sizes): kept dims pass through; expanded (size-1) dims are new."""
    io = tensor_io(node, ctx, "expand of a non-tensor")
    if io is None:
        return
    x, y = io
    xs, ys = ctx.shape_of(x), ctx.shape_of(y)
    lead = len(ys) - len(xs)
    for od in range(len(ys)):
        if od >= lead and xs[od - lead] == ys[od]:
            ctx.same(x, od - lead, y, od)
        elif ys[od] > 1 and ctx.query_heads:  # a copy factor, for prune_heads="query" (passes/dependency.py)
            ctx.expanded.add(ctx.space(y, od))


def multihead_attention(node: fx.Node, ctx: RuleContext) -> None:
    """nn.MultiheadAttention ties its input width to its head layout; it is kept whole."""
    pin_all(node, ctx, f"nn.MultiheadAttention ({node.target}) is not pruned (its embed dim is its head layout)")
    for user in node.users:  # the (output, weights) tuple is unpacked by getitem nodes
        pin_all(user, ctx, f"nn.MultiheadAttention ({node.target}) output")


FUNCTIONS = {
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul, torch.mm: matmul,
    torch.einsum: einsum, F.scaled_dot_product_attention: sdpa, torch.unbind: unbind,
}
METHODS = {"matmul": matmul, "bmm": matmul, "mm": matmul, "__matmul__": matmul, "unbind": unbind,
           "expand": expand, "expand_as": expand}
MODULES = {nn.MultiheadAttention: multihead_attention}
