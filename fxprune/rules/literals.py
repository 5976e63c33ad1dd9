"""Rewrite literal sizes in the graph (view/reshape/expand shapes, split sizes, slice bounds) after channels
were removed.

Each rewriter is the ``literals`` field of a registry entry (``rules/builtin.py``). It takes the node, its old output shape(s) and its new output shape(s), and edits ``node.args``
in place. Sizes that come from other nodes (``x.size(0)``) are computed at run time and left alone; the
shape check after rewriting proves they came out right.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import InvariantError
from fxprune.rules.tensor_ops import slice_range

Shape = tuple[int, ...]
Rewriter = Callable[[fx.Node, list[Shape], list[Shape]], None]


def _new_sizes(node: fx.Node, sizes: list[object], old: Shape, new: Shape) -> list[object]:
    if len(sizes) != len(old):
        raise InvariantError(f"shape argument of {node.format_node()} has {len(sizes)} entries for rank {len(old)}")
    out = list(sizes)
    for d, (o, n) in enumerate(zip(old, new, strict=True)):
        # A pruned dim is a channel dim, fixed by the weights: a literal, or a size computed at run
        # time from another tensor (``x.shape[2]`` of an unpruned input), becomes the new literal.
        if o != n and (isinstance(out[d], fx.Node) or (isinstance(out[d], int) and out[d] != -1)):
            out[d] = n
    return out


def shape_args(node: fx.Node, old: list[Shape], new: list[Shape]) -> None:
    """``x.view(a, b, c)`` / ``x.view((a, b, c))`` / ``torch.reshape(x, shape)`` / ``x.expand(...)``."""
    if old[0] == new[0]:
        return
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], fx.Node):
        # The whole shape is computed (``x.size()[:-1] + (self.nf,)``): spell it out, taking unpruned
        # dims from the computed shape at run time and pruned dims as literals.
        with node.graph.inserting_before(node):
            sizes = [n if o != n else node.graph.call_function(operator.getitem, (rest[0], d))
                     for d, (o, n) in enumerate(zip(old[0], new[0], strict=True))]
        node.args = (node.args[0], *sizes)
    elif len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        node.args = (node.args[0], type(rest[0])(_new_sizes(node, list(rest[0]), old[0], new[0])))
    elif "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        kwargs = dict(node.kwargs)
        kwargs[key] = tuple(_new_sizes(node, list(kwargs[key]), old[0], new[0]))
        node.kwargs = kwargs
    else:
        node.args = (node.args[0], *_new_sizes(node, list(rest), old[0], new[0]))


def split_sizes(node: fx.Node, old: list[Shape], new: list[Shape]) -> None:
    """split/chunk: always written back as explicit section sizes (``chunk`` becomes ``split``)."""
    if old == new:
        return
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = int(dim) % len(new[0])  # type: ignore[arg-type]
    sizes = [s[dim] for s in new]
    if sizes == [s[dim] for s in old]:
        return  # the split dim kept its sizes (others were pruned): sizes computed at run time stay computed
    kwargs = {k: v for k, v in node.kwargs.items() if k not in ("split_size_or_sections", "split_size", "chunks", "dim")}
    node.args = (node.args[0], sizes, dim)
    node.kwargs = kwargs
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
        # A wrapped function of the user's (``fx.wrap``) is now torch.split: generated code must not
        # re-wrap it under torch's name, which would break every later trace in the process.
        node.meta.pop("is_wrapped", None)


def fixed_attention_scale(node: fx.Node, old: list[Shape], new: list[Shape]) -> None:
    """scaled_dot_product_attention: keep the original 1/sqrt(E) when E (the q/k width) shrinks."""
    if "scale" in node.kwargs or len(node.args) > 6:
        return
    q = node.args[0]
    e = q.meta.get("fxprune_shape", (0,))[-1] if isinstance(q, fx.Node) else 0
    if e:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(e)}


def normalized_shape(node: fx.Node, old: list[Shape], new: list[Shape]) -> None:
    """F.layer_norm(x, normalized_shape, ...): the literal follows the input's last dims."""
    if old == new:
        return
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if not isinstance(shape, (list, tuple)):
        return
    fixed = type(shape)(new[0][len(new[0]) - len(shape) :])
    if len(node.args) > 1:
        node.args = (node.args[0], fixed, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": fixed}


def slice_bounds(node: fx.Node, old: list[Shape], new: list[Shape]) -> None:
    """``x[..., a:b]``: a bound on a pruned dim of ``x`` becomes the number of ``x``'s kept indices below it.

    The rewrite pass records, on the node that produces ``x``, its shape before pruning and the kept indices
    of each pruned dim (``meta["fxprune_kept"]``); only slices the rule coupled (step 1, int or open bounds)
    can be on a pruned dim.
    """
    x, idx = node.args[0], node.args[1]
    shape, kept = x.meta.get("fxprune_kept", ((), None)) if isinstance(x, fx.Node) else ((), None)
    if not kept or isinstance(idx, fx.Node):
        return
    items = list(idx) if isinstance(idx, tuple) else [idx]
    out: list[object] = []
    xd = 0
    for item in items:
        if item is Ellipsis:
            xd += len(shape) - sum(1 for i in items if i is not None and i is not Ellipsis)
        elif isinstance(item, slice) and xd in kept and (bounds := slice_range(item, shape[xd])) is not None:
            start, stop = (int(np.searchsorted(kept[xd], b)) for b in bounds)  # kept indices below each bound
            item = slice(None if item.start is None else start, None if item.stop is None else stop, item.step)
        out.append(item)
        xd += int(item is not None and item is not Ellipsis)
    node.args = (x, tuple(out) if isinstance(idx, tuple) else out[0], *node.args[2:])
