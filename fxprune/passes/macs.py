"""Predict MACs and parameter counts of a plan from shapes alone, without building the pruned model.

Counts the same ops as ``torch.utils.flop_counter`` (conv, linear/addmm, matmul/bmm, scaled dot-product
attention), so a budget search can probe many plans cheaply; the final model is measured for real.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.depgraph import param_value
from fxprune.passes.base import submodule
from fxprune.passes.dependency import DependencyResult

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def estimate_macs(gm: fx.GraphModule, deps: DependencyResult, shapes: dict[str, Shape], canonical: dict[int, str]) -> int:
    """MACs of the graph when every value has the shape given in ``shapes`` (original or planned).

    Args:
        gm: the traced (unpruned) model.
        deps: its dependency analysis.
        shapes: value name -> shape; parameters as ``param:<name>``.
        canonical: ``id(tensor)`` -> canonical parameter name (``passes.dependency.canonical_names``).
    """
    total = 0
    for node in gm.graph.nodes:
        out = shapes.get(node.name)
        if node.op == "call_module":
            mod = submodule(gm, str(node.target))
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and out is not None:
                w = shapes.get(param_value(canonical.get(id(mod.weight), "")))
                if w is None:
                    w = tuple(mod.weight.shape)
                if isinstance(mod, nn.Linear):
                    total += _numel(out) * w[1]
                elif mod.transposed:
                    x = shapes.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
                    if x is not None:
                        total += _numel(x) * w[1] * _numel(w[2:])
                else:
                    total += _numel(out) * w[1] * _numel(w[2:])
        elif node.op in ("call_function", "call_method") and out is not None:
            total += _function_macs(node, shapes, out)
    return int(total)


def _function_macs(node: fx.Node, shapes: dict[str, Shape], out: Shape) -> int:
    def shape(i: int) -> Shape | None:
        a = node.args[i] if len(node.args) > i else None
        return shapes.get(a.name) if isinstance(a, fx.Node) else None

    target = node.target
    if target in (torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", "__matmul__"):
        a = shape(0)
        return _numel(out) * a[-1] if a else 0
    if target is F.linear:
        w = shape(1)
        return _numel(out) * w[-1] if w else 0
    if target is F.scaled_dot_product_attention:
        q, k, v = shape(0), shape(1), shape(2)
        if q and k and v:
            lead = _numel(q[:-2])
            return lead * q[-2] * k[-2] * q[-1] + lead * q[-2] * k[-2] * v[-1]
    return 0
