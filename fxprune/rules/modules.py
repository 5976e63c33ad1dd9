"""Channel rules for ``call_module`` nodes (registered with the rest of an op's entry in ``rules/builtin.py``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch.fx as fx
import torch.nn as nn

from fxprune.rules.common import linear_couplings, pin_all, pooling_like, reshape_like, tensor_io, unary
from fxprune.rules.context import RuleContext


def _io(node: fx.Node, ctx: RuleContext) -> tuple[str, str] | None:
    return tensor_io(node, ctx, "unexpected inputs")


def _conv_layout(
    node: fx.Node, ctx: RuleContext, m: nn.modules.conv._ConvNd, x: str, y: str,
) -> tuple[int, str, str | None]:
    """What every conv shares: leading (batch) dims pass through, spatial dims are pinned.

    Returns:
        The channel dim of ``x``/``y`` and the weight's and bias's value names.
    """
    cd = ctx.ndim(x) - len(m.kernel_size) - 1
    w, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    assert w is not None
    for d in range(cd):
        ctx.same(x, d, y, d)
    ctx.pin(x, f"{node.name}: conv spatial dims", list(range(cd + 1, ctx.ndim(x))))
    return cd, w, b


def conv(node: fx.Node, ctx: RuleContext) -> None:
    """Conv1d/2d/3d: filters produce output channels; depthwise and grouped convs keep groups divisible.

    Grouped convs couple input channel ``i`` with every ``i + k * in_per_group`` (and likewise for outputs),
    so the same number of channels leaves every group and ``groups`` stays unchanged.
    """
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    m = ctx.module()
    assert isinstance(m, nn.modules.conv._ConvNd)
    cd, w, b = _conv_layout(node, ctx, m, x, y)
    ctx.same(y, cd, w, 0)
    if b is not None:
        ctx.same(w, 0, b, 0)
    ctx.produce(w, 0)
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    if g == 1:
        ctx.same(x, cd, w, 1)
    elif g == cin:
        mult = cout // cin
        o = np.arange(cout)
        ctx.mapped(y, cd, o, x, cd, o // mult)
    else:
        in_pg, out_pg = cin // g, cout // g
        i = np.arange(cin)
        ctx.mapped(x, cd, i, w, 1, i % in_pg)
        # Couple output k*out_pg + j across groups k through the weight's own dim 0 (a mapped self-edge).
        o = np.arange(cout)
        ctx.mapped(w, 0, o, w, 0, o % out_pg)


def conv_transpose(node: fx.Node, ctx: RuleContext) -> None:
    """ConvTranspose1d/2d/3d with groups == 1: weight is [in, out, *k]."""
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    m = ctx.module()
    assert isinstance(m, nn.modules.conv._ConvTransposeNd)
    if m.groups != 1:
        pin_all(node, ctx, f"{node.name}: grouped ConvTranspose is not pruned")
        return
    cd, w, b = _conv_layout(node, ctx, m, x, y)
    ctx.same(x, cd, w, 0)
    ctx.same(y, cd, w, 1)
    if b is not None:
        ctx.same(w, 1, b, 0)
    ctx.produce(w, 1)


def linear(node: fx.Node, ctx: RuleContext) -> None:
    """Linear: out features are produced; leading dims pass through."""
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    m = ctx.module()
    w = ctx.param(m, "weight")
    b = ctx.param(m, "bias")
    assert w is not None
    linear_couplings(ctx, x, y, w, b)
    ctx.produce(w, 0)


def batch_norm(node: fx.Node, ctx: RuleContext) -> None:
    """BatchNorm: per-channel affine and running statistics follow dim 1."""
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    unary(node, ctx)
    m = ctx.module()
    for attr in ("weight", "bias", "running_mean", "running_var"):
        p = ctx.param(m, attr)
        if p is not None:
            ctx.same(x, 1, p, 0)


def layer_norm(node: fx.Node, ctx: RuleContext) -> None:
    """LayerNorm/RMSNorm over the last dims: weight/bias follow them. A pruned model normalises over the kept
    channels, and the oracle's reference does the same (``verify.norm_spec``), so the proof stays exact."""
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    unary(node, ctx)
    m = ctx.module()
    assert isinstance(m, (nn.LayerNorm, nn.RMSNorm))
    k = len(m.normalized_shape)
    if m.weight is None and getattr(m, "bias", None) is None:  # nothing would carry the new normalized_shape
        ctx.pin(x, f"{node.name}: {type(m).__name__} without affine parameters", list(range(ctx.ndim(x) - k, ctx.ndim(x))))
    for j in range(k):
        d = ctx.ndim(x) - k + j
        for attr in ("weight", "bias"):
            p = ctx.param(m, attr)
            if p is not None:
                ctx.same(x, d, p, j)
    if k > 1:
        ctx.pin(x, f"{node.name}: LayerNorm over several dims", list(range(ctx.ndim(x) - k, ctx.ndim(x) - 1)))


def group_norm(node: fx.Node, ctx: RuleContext) -> None:
    """GroupNorm(G, C): every group loses the same positions, so G stays and each group keeps C'/G contiguous
    channels; statistics are then over each group's kept channels, as the oracle's reference computes them
    (``verify.norm_spec``). GroupNorm(1, C) is a LayerNorm over (C, H, W)."""
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    unary(node, ctx)
    m = ctx.module()
    assert isinstance(m, nn.GroupNorm)
    params = [p for p in (ctx.param(m, "weight"), ctx.param(m, "bias")) if p is not None]
    if not params:  # nothing would carry the new num_channels
        pin_all(node, ctx, f"{node.name}: GroupNorm without affine parameters")
        return
    for p in params:
        ctx.same(x, 1, p, 0)
    per = m.num_channels // m.num_groups
    if m.num_groups > 1:  # position j of every group is one channel class (a mapped self-edge)
        c = np.arange(m.num_channels)
        ctx.mapped(params[0], 0, c, params[0], 0, c % per)


def embedding(node: fx.Node, ctx: RuleContext) -> None:
    """Embedding: the embedding dim is produced by the table; index dims pass through."""
    io = _io(node, ctx)
    if io is None:
        return
    x, y = io
    w = ctx.param(ctx.module(), "weight")
    assert w is not None
    for d in range(ctx.ndim(x)):
        ctx.same(x, d, y, d)
    ctx.same(y, -1, w, 1)
    ctx.pin(w, f"{node.name}: vocabulary rows", [0])
    if ctx.module().max_norm is not None:  # the renorm's row norms span the embedding dim
        ctx.pin(w, f"{node.name}: Embedding(max_norm=...) renormalises rows over the embedding dim", [1])
    ctx.produce(w, 1)


def _pool(n_spatial: int) -> Callable[[fx.Node, RuleContext], None]:
    def rule(node: fx.Node, ctx: RuleContext) -> None:
        io = _io(node, ctx)
        if io is not None:
            pooling_like(ctx, io[0], io[1], n_spatial, node.name)

    rule.__doc__ = f"Pooling/upsampling over {n_spatial} spatial dims: channels pass through."
    return rule


MODULE_RULES: dict[type, Callable[[fx.Node, RuleContext], None]] = {
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    nn.ConvTranspose1d: conv_transpose,
    nn.ConvTranspose2d: conv_transpose,
    nn.ConvTranspose3d: conv_transpose,
    nn.Linear: linear,
    nn.BatchNorm1d: batch_norm,
    nn.BatchNorm2d: batch_norm,
    nn.BatchNorm3d: batch_norm,
    nn.LayerNorm: layer_norm,
    nn.GroupNorm: group_norm,
    nn.modules.instancenorm._InstanceNorm: batch_norm,  # per-channel statistics, like BatchNorm
    nn.Embedding: embedding,
    nn.RMSNorm: layer_norm,
    nn.Flatten: reshape_like,
    nn.Unflatten: reshape_like,
}
for _t in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d):
    MODULE_RULES[_t] = _pool(1)
for _t in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
           nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    MODULE_RULES[_t] = _pool(2)
for _t in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d):
    MODULE_RULES[_t] = _pool(3)
def softmax_module(node: fx.Node, ctx: RuleContext) -> None:
    """nn.Softmax / nn.LogSoftmax: shape-preserving; the normalised dim is pinned."""
    io = _io(node, ctx)
    if io is None:
        return
    unary(node, ctx)
    dim = getattr(ctx.module(), "dim", None)
    if isinstance(dim, int):
        ctx.pin(io[0], f"{node.name}: softmax normalises over this dim", [dim % ctx.ndim(io[0])])
    else:
        pin_all(node, ctx, f"{node.name}: softmax without an explicit dim")


MODULE_RULES[nn.Softmax] = softmax_module
MODULE_RULES[nn.LogSoftmax] = softmax_module
# Padding modules pad the trailing 1, 2 or 3 dims (spatial in N, C, ...): the leading dims pass through.
for _n, _types in ((1, (nn.ConstantPad1d, nn.ZeroPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d, nn.CircularPad1d)),
                   (2, (nn.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)),
                   (3, (nn.ConstantPad3d, nn.ZeroPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d))):
    for _t in _types:
        MODULE_RULES[_t] = _pool(_n)
# Elementwise modules without parameters: the output has the input's shape and dtype, whatever their settings
# (the meta shape run in ``passes/shapes.py`` passes their input through instead of running them). A set of
# exact types, tested with ``type(m) in``: a subclass may override forward.
SHAPE_KEEPING_MODULES = frozenset({
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
})
for _t in SHAPE_KEEPING_MODULES:
    MODULE_RULES[_t] = unary


def prelu(node: fx.Node, ctx: RuleContext) -> None:
    """PReLU: a per-channel slope follows dim 1 (a single shared slope couples nothing)."""
    unary(node, ctx)
    x = ctx.tensor(node.args[0]) if node.args else None
    p = ctx.param(ctx.module(), "weight")
    if x is not None and p is not None and ctx.shape_of(p)[0] > 1:
        ctx.same(x, 1, p, 0)


MODULE_RULES[nn.PReLU] = prelu  # one slope per channel: not elementwise-uniform


def _shuffle_module(node: fx.Node, ctx: RuleContext) -> None:
    """nn.PixelShuffle / nn.PixelUnshuffle: the functional rule."""
    from fxprune.rules.tensor_ops import pixel_shuffle

    pixel_shuffle(isinstance(ctx.module(), nn.PixelUnshuffle))(node, ctx)


MODULE_RULES[nn.PixelShuffle] = _shuffle_module
MODULE_RULES[nn.PixelUnshuffle] = _shuffle_module


# ---- third-party composites kept whole ---------------------------------------------------------------
# A library module whose forward we have read, traced as one leaf when every part of it is channelwise: fewer
# nodes to trace, check and generate (timm's BatchNormAct2d traces to eleven nodes: a rank check, four tensor
# reads, batch_norm, drop, act). Registered by dotted class path (``rules/builtin.py``), so that the library
# is never imported.
# Only the exact class qualifies (a subclass may compute something else), and only when its parts are
# parameter-free elementwise modules of exact known types; otherwise it is traced through as before. The
# forward was read in timm 1.0.x; ``verify=True`` (the mask oracle) re-checks any result.


def timm_norm_act(m: nn.Module) -> bool:
    """timm ``BatchNormAct2d``: ``F.batch_norm`` over dim 1, then ``self.drop``, then ``self.act``."""
    parts = m.__dict__.get("_modules", {})
    return set(parts) == {"drop", "act"} and all(type(p) in SHAPE_KEEPING_MODULES for p in parts.values())
