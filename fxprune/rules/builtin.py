"""Every built-in registry entry, registered here and nowhere else.

Ops that carry more than a channel rule (literal sizes, a shape shortcut, a MAC formula, an attribute
fix-up) are listed one entry per op, with all their parts side by side. The many ops that have only a
channel rule (elementwise, layout, pooling) come from the rule tables of ``rules/*.py``, registered first.
``install`` runs once, on the first registry lookup (``registry.load_builtins``), as the loader that
``rules/__init__.py`` hands the registry (the registry imports no entry itself).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune.rules.attention as attention
import fxprune.rules.fixups as fixups
import fxprune.rules.functional as functional
import fxprune.rules.literals as literals
import fxprune.rules.mac_formulas as macs
import fxprune.rules.modules as modules
import fxprune.rules.shape_formulas as shape_fns
import fxprune.rules.tensor_ops as tensor_ops
import fxprune.rules.traits as traits
import fxprune.rules.windows as windows
from fxprune.rules.registry import OpSpec, register


def _modules() -> None:
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register(t, OpSpec(rule=modules.conv, shape=shape_fns.conv, macs=macs.conv_module))
    for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register(t, OpSpec(rule=modules.conv_transpose, macs=macs.conv_module))
    register(nn.modules.conv._ConvNd, fixup=fixups.conv)  # every conv, subclasses included
    register(nn.Linear, OpSpec(rule=modules.linear, shape=shape_fns.linear, macs=macs.linear_module,
                               fixup=fixups.linear))
    register("transformers.pytorch_utils.Conv1D", fixup=fixups.hf_conv1d)  # traced through; weight [in, out]
    register("ultralytics.nn.modules.block.C2f", fixup=fixups.ultralytics_c2f)  # and its subclass C3k2
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.modules.instancenorm._InstanceNorm):
        register(t, rule=modules.batch_norm)  # per-channel statistics
    register(nn.modules.batchnorm._NormBase, fixup=fixups.batch_norm)
    register(nn.LayerNorm, OpSpec(rule=modules.layer_norm, fixup=fixups.layer_norm))
    register(nn.RMSNorm, OpSpec(rule=modules.layer_norm, fixup=fixups.layer_norm))
    register(nn.GroupNorm, OpSpec(rule=modules.group_norm, fixup=fixups.group_norm))
    register(nn.Embedding, OpSpec(rule=modules.embedding, fixup=fixups.embedding))
    register(nn.PReLU, OpSpec(rule=modules.prelu, fixup=fixups.prelu))
    for t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
        register(t, shape=shape_fns.adaptive_pool)
    # timm's BatchNormAct2d: one leaf with the BatchNorm rule when its drop and act are elementwise
    # (its forward was read in timm 1.0.x; ``verify=True`` re-checks any result).
    register("timm.layers.norm_act.BatchNormAct2d", rule=modules.batch_norm, qualifies=modules.timm_norm_act)


def _functions() -> None:
    for fn in (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm):
        register(fn, OpSpec(rule=functional.layer_norm, literals=literals.normalized_shape))
    register(F.scaled_dot_product_attention, OpSpec(rule=attention.sdpa, literals=literals.fixed_attention_scale,
                                                    macs=macs.sdpa))
    register(torch.reshape, OpSpec(rule=tensor_ops.reshape_like, literals=literals.shape_args))
    for fn in (torch.split, torch.chunk):
        register(fn, OpSpec(rule=tensor_ops.split, literals=literals.split_sizes))
    register(operator.getitem, OpSpec(rule=tensor_ops.getitem, literals=literals.slice_bounds))  # x[..., a:b]
    for fn in (torch.matmul, operator.matmul, torch.mm, torch.bmm):
        register(fn, OpSpec(rule=attention.matmul, macs=macs.matmul))
    register(torch.baddbmm, macs=macs.baddbmm)
    register(torch.einsum, OpSpec(rule=attention.einsum, macs=macs.einsum))
    for fn in (F.linear, torch._C._nn.linear):
        register(fn, OpSpec(rule=functional.linear, macs=macs.linear_fn))
    register(torch.addmm, OpSpec(rule=functional.addmm, macs=macs.addmm))  # Hugging Face Conv1D
    for fn in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
        register(fn, macs=macs.conv_fn(transposed=False))
    for fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        register(fn, macs=macs.conv_fn(transposed=True))
    for fn in (operator.add, operator.sub, operator.mul):
        register(fn, OpSpec(rule=tensor_ops.broadcast, shape=shape_fns.OP_ARITH))
    register(operator.truediv, OpSpec(rule=tensor_ops.broadcast, shape=shape_fns.OP_DIV))
    for fn in (torch.add, torch.sub, torch.mul):
        register(fn, OpSpec(rule=tensor_ops.broadcast, shape=shape_fns.ARITH))
    for fn in (torch.div, torch.true_divide):
        register(fn, OpSpec(rule=tensor_ops.broadcast, shape=shape_fns.DIV))
    register(torch.sum, OpSpec(rule=tensor_ops.reduction(True), shape=shape_fns.reduction))
    register(torch.mean, OpSpec(rule=tensor_ops.reduction(False), shape=shape_fns.reduction))
    register(F.interpolate, OpSpec(rule=tensor_ops.interpolate, shape=shape_fns.interpolate))


def _methods() -> None:
    for name in ("view", "reshape"):
        register(name, OpSpec(rule=tensor_ops.reshape_like, literals=literals.shape_args))
    register("expand", OpSpec(rule=attention.expand, literals=literals.shape_args))
    for name in ("split", "chunk"):
        register(name, OpSpec(rule=tensor_ops.split, literals=literals.split_sizes))
    for name in ("matmul", "bmm", "mm", "__matmul__"):
        register(name, OpSpec(rule=attention.matmul, macs=macs.matmul))
    register("baddbmm", macs=macs.baddbmm)
    register("addmm", macs=macs.addmm)
    for name in ("add", "sub", "mul"):
        register(name, OpSpec(rule=tensor_ops.broadcast, shape=shape_fns.ARITH))
    for name in ("div", "true_divide"):
        register(name, OpSpec(rule=tensor_ops.broadcast, shape=shape_fns.DIV))
    register("sum", OpSpec(rule=tensor_ops.reduction(True), shape=shape_fns.reduction))
    register("mean", OpSpec(rule=tensor_ops.reduction(False), shape=shape_fns.reduction))


def _rule_tables() -> None:
    """The ops with a channel rule only, from the rule modules' tables (a later table wins)."""
    for table in (modules.MODULE_RULES, attention.MODULES, tensor_ops.FUNCTION_RULES, attention.FUNCTIONS,
                  functional.FUNCTIONS, windows.FUNCTIONS, tensor_ops.METHOD_RULES, attention.METHODS):
        for op, rule in table.items():
            register(op, rule=rule)


def install() -> None:
    """Register every built-in entry (called once by the registry)."""
    _rule_tables()
    _modules()
    _functions()
    _methods()
    traits.install()  # last: the traits join the entries above
