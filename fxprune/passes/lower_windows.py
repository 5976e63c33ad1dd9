"""Lowering: torchvision's ``shifted_window_attention`` (Swin, Swin-V2) written out as graph ops.

torchvision wraps the function for torch.fx, so a traced Swin calls it as one opaque op, and it could not be
pruned anyway: it reads the head dim from its *input* width (``C // num_heads``), which ties the attention's
inner width to the residual stream. Written out, the inner width is the qkv Linear's own (a literal, rewritten
like any other), the q scale keeps its original value, and heads are a reshape with exact rules. The window
bookkeeping that branches on the map size stays Python in the three ops of ``window_ops.py``, so the graph
is not specialised to the example input's size.

Only eval-mode calls (or calls without dropout) are lowered; any other call is left as it is, with a reason.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxprune.passes.base import GraphPass, PassResult, submodule
from fxprune.passes.window_ops import window_mask, window_partition, window_reverse

log = logging.getLogger(__name__)

_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
         "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def _targets() -> tuple[Any, ...]:
    try:
        from torchvision.models import swin_transformer
    except ImportError:  # pragma: no cover - torchvision is optional
        return ()
    return (swin_transformer.shifted_window_attention,)


def _bound(node: fx.Node) -> dict[str, Any]:
    a = dict(zip(_ARGS, node.args, strict=False))
    a.update(node.kwargs)
    return a


def _why_not(gm: fx.GraphModule, a: dict[str, Any]) -> str:
    """Why this call cannot be lowered exactly ("" when it can)."""
    if a.get("training") and (a.get("attention_dropout") or a.get("dropout")):
        return "dropout in training mode"
    w = a.get("qkv_weight")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return "its qkv weight is not a parameter"
    if not isinstance(a.get("num_heads"), int) or not all(isinstance(v, int) for v in (*a["window_size"], *a["shift_size"])):
        return "head count or window sizes are not literals"
    rows = _fetch(gm, str(w.target)).shape[0]
    if rows % (3 * a["num_heads"]):
        return f"qkv width {rows} is not 3 x num_heads x head_dim"
    return ""


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(submodule(gm, owner), attr)


class LowerWindowAttention(GraphPass):
    """Lower every eligible ``shifted_window_attention`` call in place; ``changes`` lists the lowered nodes."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        targets = _targets()
        done = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in targets:
                continue
            a = _bound(node)
            why = _why_not(gm, a)
            if why:
                log.info("fxprune: %s is kept whole (%s)", node.name, why)
                continue
            stack = node.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack)) if stack else ""
            # The user's module still calls torchvision's function, which reads the head dim from its input
            # width: as output="module" it can only be kept whole (see passes/writeback.py).
            gm.meta.setdefault("fxprune_lowered", {})[owner] = (
                "torchvision's shifted_window_attention reads its head dim from its input width"
            )
            done.append(node.name)
            _lower(gm, node, a)
        return PassResult(gm, bool(done), tuple(done))


def _lower(gm: fx.GraphModule, node: fx.Node, a: dict[str, Any]) -> None:
    g = gm.graph
    x, heads = a["input"], a["num_heads"]
    window, shift = list(a["window_size"]), list(a["shift_size"])
    inner = _fetch(gm, str(a["qkv_weight"].target)).shape[0] // 3
    head_dim = inner // heads
    with g.inserting_before(node):
        h, w = g.call_method("size", (x, 1)), g.call_method("size", (x, 2))
        xw = g.call_function(window_partition, (x, window, shift))
        n_b, n = g.call_method("size", (xw, 0)), g.call_method("size", (xw, 1))
        bias = a.get("qkv_bias")
        if a.get("logit_scale") is not None and bias is not None:  # V2: the k bias is zero
            parts = g.call_method("chunk", (bias, 3))
            q_b, k_b, v_b = (g.call_function(operator.getitem, (parts, i)) for i in range(3))
            bias = g.call_function(torch.cat, ([q_b, g.call_function(operator.mul, (k_b, 0.0)), v_b],))
        qkv = g.call_function(F.linear, (xw, a["qkv_weight"], bias))
        qkv = g.call_method("permute", (g.call_method("reshape", (qkv, n_b, n, 3, heads, head_dim)), 2, 0, 3, 1, 4))
        q, k, v = (g.call_function(operator.getitem, (qkv, i)) for i in range(3))
        if a.get("logit_scale") is not None:  # V2: cosine attention with a learned per-head scale
            q_n = g.call_function(F.normalize, (q,), {"dim": -1})
            k_n = g.call_function(F.normalize, (k,), {"dim": -1})
            attn = g.call_method("matmul", (q_n, g.call_method("transpose", (k_n, -2, -1))))
            scale = g.call_method("exp", (g.call_function(torch.clamp, (a["logit_scale"],), {"max": math.log(100.0)}),))
            attn = g.call_function(operator.mul, (attn, scale))
        else:
            q = g.call_function(operator.mul, (q, head_dim**-0.5))  # the original scale, kept when head_dim shrinks
            attn = g.call_method("matmul", (q, g.call_method("transpose", (k, -2, -1))))
        attn = g.call_function(operator.add, (attn, a["relative_position_bias"]))
        attn = g.call_function(window_mask, (attn, h, w, window, shift))
        attn = g.call_function(F.softmax, (attn,), {"dim": -1})
        if a.get("training") and a.get("attention_dropout"):  # pragma: no cover - refused by _why_not
            attn = g.call_function(F.dropout, (attn,), {"p": a["attention_dropout"], "training": True})
        out = g.call_method("matmul", (attn, v))
        out = g.call_method("reshape", (g.call_method("transpose", (out, 1, 2)), n_b, n, inner))
        out = g.call_function(F.linear, (out, a["proj_weight"], a.get("proj_bias")))
        out = g.call_function(window_reverse, (out, h, w, window, shift))
    for n in g.nodes:
        if n.op == "call_function" and n.target in (window_partition, window_mask, window_reverse):
            n.meta["is_wrapped"] = True  # the generated code re-wraps them: a saved GraphModule reloads
    node.replace_all_uses_with(out)
    g.erase_node(node)
