"""Channel rules for window attention: fxprune's window ops and torchvision's fx-wrapped Swin helpers.

All of them move or mask positions and never mix channels, so channel ``c`` of the output is channel ``c``
of the input (patch merging: four copies of it); every position dim is pinned.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx
import torch.nn.functional as F

from fxprune.passes.window_ops import window_mask, window_partition, window_reverse
from fxprune.rules.common import pin_all, tensor_io, unary
from fxprune.rules.context import RuleContext


def _channels_last(node: fx.Node, ctx: RuleContext, what: str) -> None:
    """Last dim passes through; every other dim of input and output is a position (pinned)."""
    io = tensor_io(node, ctx, f"{what} without a tensor input")
    if io is None:
        return
    x, y = io
    ctx.same(x, -1, y, -1)
    ctx.pin(x, f"{node.name}: {what} moves positions", list(range(ctx.ndim(x) - 1)))
    ctx.pin(y, f"{node.name}: {what} moves positions", list(range(ctx.ndim(y) - 1)))


def partition(node: fx.Node, ctx: RuleContext) -> None:
    """window_partition: ``[B, H, W, C] -> [B * windows, N, C]``."""
    _channels_last(node, ctx, "window partition")


def reverse(node: fx.Node, ctx: RuleContext) -> None:
    """window_reverse: ``[B * windows, N, C] -> [B, H, W, C]``."""
    _channels_last(node, ctx, "window merge")


def mask(node: fx.Node, ctx: RuleContext) -> None:
    """window_mask: adds a mask over positions to ``[B * windows, heads, N, N]``; the heads dim passes through."""
    x = ctx.tensor(node.args[0]) if node.args else None
    y = ctx.out()
    if x is None or y is None or ctx.ndim(x) != 4:
        pin_all(node, ctx, f"{node.name}: window mask on an unexpected value")
        return
    ctx.same(x, 1, y, 1)
    for v in (x, y):
        ctx.pin(v, f"{node.name}: the window mask depends on positions", [0, 2, 3])


def patch_merging_pad(node: fx.Node, ctx: RuleContext) -> None:
    """torchvision ``_patch_merging_pad``: ``[..., H, W, C] -> [..., H/2, W/2, 4C]``, four copies of the channels."""
    x = ctx.tensor(node.args[0]) if node.args else None
    y = ctx.out()
    if x is None or y is None or ctx.ndim(x) != ctx.ndim(y) or ctx.shape_of(y)[-1] != 4 * ctx.shape_of(x)[-1]:
        pin_all(node, ctx, f"{node.name}: patch merging on an unexpected value")
        return
    c = ctx.shape_of(x)[-1]
    for k in range(4):
        ctx.mapped(x, -1, np.arange(c), y, -1, k * c + np.arange(c))
    for d in range(ctx.ndim(x) - 3):
        ctx.same(x, d, y, d)
    for v in (x, y):
        ctx.pin(v, f"{node.name}: patch merging moves positions", [ctx.ndim(v) - 3, ctx.ndim(v) - 2])


def relative_position_bias(node: fx.Node, ctx: RuleContext) -> None:
    """torchvision ``_get_relative_position_bias(table [L, heads], index, window)`` -> ``[1, heads, N, N]``."""
    table = ctx.tensor(node.args[0]) if node.args else None
    y = ctx.out()
    if table is None or y is None or ctx.ndim(table) != 2 or ctx.ndim(y) != 4:
        pin_all(node, ctx, f"{node.name}: relative position bias of an unexpected shape")
        return
    index = ctx.tensor(node.args[1]) if len(node.args) > 1 else None
    if index is not None:
        ctx.pin(index, f"{node.name}: position index")
    ctx.same(table, 1, y, 1)
    ctx.pin(table, f"{node.name}: table rows are relative positions", [0])
    ctx.pin(y, f"{node.name}: positions", [0, 2, 3])


FUNCTIONS: dict[object, object] = {
    window_partition: partition,
    window_reverse: reverse,
    window_mask: mask,
    # An Lp normalisation over a dim: pruned (zeroed) channels add nothing to the norm, so it is exact.
    F.normalize: unary,
}


def _optional() -> None:
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:  # pragma: no cover - torchvision is optional
        return
    FUNCTIONS[swin._patch_merging_pad] = patch_merging_pad
    FUNCTIONS[swin._get_relative_position_bias] = relative_position_bias


_optional()
