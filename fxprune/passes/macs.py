"""Predict MACs and parameter counts of a plan from shapes alone, without building the pruned model.

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts, with torch's own shape formulas
(``conv_flop_count``, ``mm_flop``, ``bmm_flop``, ``sdpa_flop_count``): convolutions (modules and
``F.conv*``), linear layers (``nn.Linear``, ``F.linear``, ``addmm`` as in Hugging Face's Conv1D), ``mm``,
``bmm``, ``baddbmm``, ``matmul``, two-operand ``einsum`` and scaled dot-product attention. MACs are half of
torch's flops. A budget search probes many plans with it cheaply; ``tests/test_macs.py`` checks parity with
``FlopCounterMode`` on real models.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import bmm_flop, conv_flop_count, mm_flop, sdpa_flop_count

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
        if out is None:
            continue
        if node.op == "call_module":
            mod = submodule(gm, str(node.target))
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                w = shapes.get(param_value(canonical.get(id(mod.weight), ""))) or tuple(mod.weight.shape)
                x = _shape_of(node.args[0] if node.args else None, shapes)
                if isinstance(mod, nn.Linear):
                    total += _numel(out) * w[1]
                elif x is not None:
                    total += _conv(x, w, out, mod.transposed)
        elif node.op in ("call_function", "call_method"):
            total += _function_macs(node, shapes, out)
    return int(total)


def _shape_of(arg: object, shapes: dict[str, Shape]) -> Shape | None:
    return shapes.get(arg.name) if isinstance(arg, fx.Node) else None


def _conv(x: Shape, w: Shape, out: Shape, transposed: bool) -> int:
    if len(x) == len(w) - 1:  # an unbatched input: torch adds the batch dim of 1
        x, out = (1, *x), (1, *out)
    return conv_flop_count(list(x), list(w), list(out), transposed=transposed) // 2


_CONVS = {F.conv1d: False, F.conv2d: False, F.conv3d: False, torch.conv1d: False, torch.conv2d: False,
          torch.conv3d: False, F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}
_MATMULS = (torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "bmm", "mm", "__matmul__")


def _function_macs(node: fx.Node, shapes: dict[str, Shape], out: Shape) -> int:
    def shape(i: int, name: str = "") -> Shape | None:
        a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
        return _shape_of(a, shapes)

    target = node.target
    if target in _MATMULS:
        a = shape(0)
        return _numel(out) * a[-1] if a else 0
    if target is F.linear:
        w = shape(1, "weight")
        return _numel(out) * w[-1] if w else 0
    if target in (torch.addmm, "addmm"):  # bias + a @ b (Hugging Face Conv1D)
        a, b = shape(1), shape(2)
        return mm_flop(a, b) // 2 if a and b else 0
    if target in (torch.baddbmm, "baddbmm"):
        a, b = shape(1), shape(2)
        return bmm_flop(a, b) // 2 if a and b else 0
    if target in _CONVS:
        x, w = shape(0, "input"), shape(1, "weight")
        return _conv(x, w, out, _CONVS[target]) if x and w else 0  # type: ignore[index]
    if target is torch.einsum:
        return _einsum(node, shapes)
    if target is F.scaled_dot_product_attention:
        q, k, v = shape(0, "query"), shape(1, "key"), shape(2, "value")
        if q and k and v and len(q) == len(k) == len(v) >= 2:
            lead = (1,) * (4 - len(q))
            q4, k4, v4 = ((_numel(s[:-3]) if len(s) > 3 else 1, *(lead + s)[-3:]) for s in (q, k, v))
            if q4[1] != k4[1] and node.kwargs.get("enable_gqa") is not True:
                return 0
            return sdpa_flop_count(q4, k4, v4) // 2
    return 0


def _einsum(node: fx.Node, shapes: dict[str, Shape]) -> int:
    """Two-operand ``einsum``: the product of every index's size (what its ``bmm`` decomposition costs)."""
    eq = node.args[0] if node.args else None
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) != 2:
        return 0
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, op in zip(lhs, ops, strict=False):
        s = _shape_of(op, shapes)
        if s is None:
            return 0
        if "..." in term:  # the ellipsis covers the dims the letters do not name, counted from the right
            before, after = term.split("...")
            n = len(s) - len(before) - len(after)
            term = before + "".join(chr(0x100 + i) for i in range(n)) + after
        if len(term) != len(s):
            return 0
        for letter, size in zip(term, s, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return _numel(tuple(sizes.values()))
