"""Lowering: replace ``nn.MultiheadAttention`` calls by the functional ops they compute, so heads can be pruned.

``nn.MultiheadAttention`` uses one number, ``embed_dim``, for its input width, its q/k/v width and its output
width, so as a module it can only be kept whole. Its computation does not need that: q/k/v are one Linear
(``in_proj_weight``), heads are a reshape, attention is ``scaled_dot_product_attention`` and the output is a
Linear (``out_proj``). Written out in the graph, those ops have exact rules, the inner width becomes free of the
input width, and the literals (head count, head dim) are rewritten like any others.

Only the common self-attention call is lowered: query, key and value the same tensor, ``batch_first=True``,
no masks, no bias_k/bias_v, no zero attention, no dropout at eval, and the attention weights unused (torchvision
ViT's ``self_attention(x, x, x, need_weights=False)``). Any other call is left as it is (kept whole, with
a reason). The parameters keep their names: the state_dict of the result has the original's keys; the module
stays in the GraphModule as the holder of its (pruned) parameters and is no longer called.
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.passes.base import GraphPass, PassResult, submodule

log = logging.getLogger(__name__)

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")


def _call_args(node: fx.Node) -> dict[str, object]:
    bound = dict(zip(_ARGS, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _why_not(node: fx.Node, mod: nn.MultiheadAttention) -> str:
    """Why this call cannot be lowered exactly ("" when it can)."""
    a = _call_args(node)
    if not (a.get("query") is a.get("key") is a.get("value")):
        return "query, key and value are not one tensor"
    if a.get("key_padding_mask") is not None or a.get("attn_mask") is not None or a.get("is_causal"):
        return "a mask"
    if not mod.batch_first or not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        return "not batch_first, separate q/k/v weights, bias_k/bias_v or add_zero_attn"
    if mod.training and mod.dropout > 0:
        return "attention dropout in training mode"
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return f"its output is used by {user.name}, not unpacked"
        if user.args[1] == 1 and user.users:
            return "the attention weights are used"
    return ""


class LowerMultiheadAttention(GraphPass):
    """Lower every eligible ``nn.MultiheadAttention`` call in place (opaque leaves excepted); ``changes``
    lists the lowered targets."""

    def __init__(self, opaque: set[str] | None = None) -> None:
        self.opaque = opaque or set()

    def call(self, gm: fx.GraphModule) -> PassResult:
        lowered = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or str(node.target) in self.opaque:
                continue
            mod = submodule(gm, str(node.target))
            if not isinstance(mod, nn.MultiheadAttention):
                continue
            why = _why_not(node, mod)
            if why:
                log.info("fxprune: %s is kept whole (%s)", node.target, why)
                continue
            _lower(gm.graph, node, mod)
            lowered.append(str(node.target))
        return PassResult(gm, bool(lowered), tuple(lowered))


def _lower(graph: fx.Graph, node: fx.Node, mod: nn.MultiheadAttention) -> None:
    target, x = str(node.target), _call_args(node)["query"]
    heads, dim = mod.num_heads, mod.embed_dim
    with graph.inserting_before(node):
        bias = graph.get_attr(f"{target}.in_proj_bias") if mod.in_proj_bias is not None else None
        qkv = graph.call_function(F.linear, (x, graph.get_attr(f"{target}.in_proj_weight"), bias))
        b, n = graph.call_method("size", (x, 0)), graph.call_method("size", (x, 1))
        split = graph.call_method("reshape", (qkv, b, n, 3, heads, dim // heads))
        parts = graph.call_method("unbind", (graph.call_method("permute", (split, 2, 0, 3, 1, 4)), 0))
        q, k, v = (graph.call_function(operator.getitem, (parts, i)) for i in range(3))
        attn = graph.call_function(F.scaled_dot_product_attention, (q, k, v))
        merged = graph.call_method("reshape", (graph.call_method("transpose", (attn, 1, 2)), b, n, dim))
        out_bias = graph.get_attr(f"{target}.out_proj.bias") if mod.out_proj.bias is not None else None
        out = graph.call_function(F.linear, (merged, graph.get_attr(f"{target}.out_proj.weight"), out_bias))
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)
