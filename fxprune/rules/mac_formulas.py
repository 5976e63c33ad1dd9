"""MAC formulas of the ops that multiply and add: each is the ``macs`` field of its ops' registry entries
(``rules/builtin.py``); ``passes/macs.py`` adds them up over a graph. Counts follow torch's flop counter
(``torch.utils.flop_counter``): one MAC per multiply-add."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.fx as fx
from torch.utils.flop_counter import bmm_flop, conv_flop_count, mm_flop, sdpa_flop_count

if TYPE_CHECKING:
    from fxprune.rules.registry import MacFn, MacQuery

Shape = tuple[int, ...]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _conv(x: Shape, w: Shape, out: Shape, transposed: bool) -> int:
    if len(x) == len(w) - 1:  # an unbatched input: torch adds the batch dim of 1
        x, out = (1, *x), (1, *out)
    return conv_flop_count(list(x), list(w), list(out), transposed=transposed) // 2


def conv_module(q: MacQuery) -> int:
    """``nn.Conv*d`` and ``nn.ConvTranspose*d``."""
    x, w = q.arg(0), q.param_shape(q.module, "weight")  # type: ignore[misc, arg-type]
    return _conv(x, w, q.out, q.module.transposed) if x and w else 0  # type: ignore[union-attr]


def linear_module(q: MacQuery) -> int:
    """``nn.Linear``: every output element is one dot product over the input width."""
    w = q.param_shape(q.module, "weight")  # type: ignore[misc, arg-type]
    return _numel(q.out) * w[1] if w else 0


def conv_fn(transposed: bool) -> MacFn:
    """``F.conv*d`` / ``F.conv_transpose*d`` with the input and weight as traced values."""

    def fn(q: MacQuery) -> int:
        x, w = q.arg(0, "input"), q.arg(1, "weight")
        return _conv(x, w, q.out, transposed) if x and w else 0

    return fn


def matmul(q: MacQuery) -> int:
    """``matmul``, ``mm``, ``bmm`` and ``@``: the output size times the contracted width."""
    a = q.arg(0)
    return _numel(q.out) * a[-1] if a else 0


def linear_fn(q: MacQuery) -> int:
    """``F.linear(x, weight)``."""
    w = q.arg(1, "weight")
    return _numel(q.out) * w[-1] if w else 0


def addmm(q: MacQuery) -> int:
    """``addmm(bias, a, b)`` = bias + a @ b (Hugging Face Conv1D)."""
    a, b = q.arg(1), q.arg(2)
    return mm_flop(a, b) // 2 if a and b else 0


def baddbmm(q: MacQuery) -> int:
    """``baddbmm(bias, a, b)``: a batched ``addmm``."""
    a, b = q.arg(1), q.arg(2)
    return bmm_flop(a, b) // 2 if a and b else 0


def sdpa(q: MacQuery) -> int:
    """``F.scaled_dot_product_attention`` (grouped-query attention only with ``enable_gqa=True``, as torch)."""
    qs, ks, vs = q.arg(0, "query"), q.arg(1, "key"), q.arg(2, "value")
    if not (qs and ks and vs and len(qs) == len(ks) == len(vs) >= 2):
        return 0
    lead = (1,) * (4 - len(qs))
    q4, k4, v4 = ((_numel(s[:-3]) if len(s) > 3 else 1, *(lead + s)[-3:]) for s in (qs, ks, vs))
    if q4[1] != k4[1] and q.node.kwargs.get("enable_gqa") is not True:
        return 0
    return sdpa_flop_count(q4, k4, v4) // 2


def einsum(q: MacQuery) -> int:
    """Two-operand ``einsum``: the product of every index's size (what its ``bmm`` decomposition costs)."""
    node = q.node
    eq = node.args[0] if node.args else None
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) != 2:
        return 0
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, op in zip(lhs, ops, strict=False):
        s = q.shapes.get(op.name) if isinstance(op, fx.Node) else None
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
