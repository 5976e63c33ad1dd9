"""Attention bookkeeping attributes that must follow the pruned widths (num_heads, head_dim, ...).

The traced forward of a GraphModule no longer reads these attributes (their values were baked into the
graph and rewritten there), but users, exporters and re-tracing do: a pruned model must not say
``num_heads=4, head_dim=64`` while its q projection is 128 wide.
"""

from __future__ import annotations

import logging

import torch.nn as nn

log = logging.getLogger(__name__)

# (heads attribute, head-dim attribute, total-width attribute or "", q-projection child names, q share of it)
_LAYOUTS = [
    ("num_heads", "head_dim", "", ("qkv",), 3),
    ("num_heads", "head_dim", "", ("q", "q_proj", "query", "to_q"), 1),
    ("num_attention_heads", "attention_head_size", "all_head_size", ("query",), 1),
    ("num_attention_heads", "head_dim", "", ("q_proj", "query", "q"), 1),
    ("num_heads", "head_dim", "split_size", ("c_attn",), 3),
    ("n_head", "head_dim", "split_size", ("c_attn",), 3),
]


def fix_attention_attributes(root: nn.Module, prune_heads: bool = False) -> list[str]:
    """Recompute head attributes from the (pruned) q projection; returns the modules changed.

    Args:
        root: the pruned model.
        prune_heads: heads were removed whole (the head count follows the width, the head dim stays);
            otherwise every head was thinned (the head dim follows the width, the head count stays).
    """
    changed = []
    for name, mod in root.named_modules():
        for heads_attr, dim_attr, total_attr, q_names, share in _LAYOUTS:
            heads = int_attribute(mod, heads_attr)
            if heads is None or int_attribute(mod, dim_attr) is None or heads <= 0:
                continue
            q = next((getattr(mod, c) for c in q_names if isinstance(getattr(mod, c, None), nn.Module)), None)
            width = out_width(q)
            head_dim = getattr(mod, dim_attr)
            unit = share * (head_dim if prune_heads else heads)
            if width is None or head_dim <= 0 or width % unit:
                continue
            if prune_heads:
                heads = width // unit
            else:
                head_dim = width // unit
            if (heads, head_dim) != (getattr(mod, heads_attr), getattr(mod, dim_attr)):
                setattr(mod, heads_attr, heads)
                setattr(mod, dim_attr, head_dim)
                if total_attr and isinstance(getattr(mod, total_attr, None), int):
                    setattr(mod, total_attr, head_dim * heads)
                changed.append(name)
            break
    return changed + fix_fused_kv_heads(root) + fix_kv_groups(root) + fix_mlp_attributes(root)


def fix_fused_kv_heads(root: nn.Module) -> list[str]:
    """Phi-3's attention: ``qkv_proj`` holds q (as wide as ``o_proj``'s input), then k and v, each
    ``num_key_value_heads * head_dim`` wide; the head count follows the pruned projection."""
    changed = []
    for name, mod in root.named_modules():
        kv, hd, o = int_attribute(mod, "num_key_value_heads"), int_attribute(mod, "head_dim"), getattr(mod, "o_proj", None)
        qkv = out_width(getattr(mod, "qkv_proj", None))
        if kv is None or not hd or qkv is None or not isinstance(o, nn.Linear):
            continue
        new, rest = divmod(qkv - o.in_features, 2 * hd)
        if not rest and 0 < new != kv:
            mod.num_key_value_heads = new
            changed.append(name)
    return changed


def fix_kv_groups(root: nn.Module) -> list[str]:
    """Grouped-query attention's ``num_key_value_groups`` (query heads per key/value head, Llama's
    ``repeat_kv`` factor) follows the pruned q and k projections (``prune_heads="query"`` changes it)."""
    changed = []
    for name, mod in root.named_modules():
        groups, hd = int_attribute(mod, "num_key_value_groups"), int_attribute(mod, "head_dim")
        q, k = out_width(getattr(mod, "q_proj", None)), out_width(getattr(mod, "k_proj", None))
        if groups is None or not hd or q is None or k is None or q % hd or k % hd or not k or (q // hd) % (k // hd):
            continue
        new = (q // hd) // (k // hd)
        if 0 < new != groups:
            mod.num_key_value_groups = new
            changed.append(name)
    return changed


# ``hidden_size`` only beside a Llama-style ``down_proj``: beside an ``fc2`` it may name the inner width.
_MLP_LAYOUTS = (("intermediate_size", ("up_proj", "gate_proj", "fc1", "c_fc")), ("hidden_size", ("down_proj",)))


def fix_mlp_attributes(root: nn.Module) -> list[str]:
    """An MLP's recorded widths (Llama's ``intermediate_size``/``hidden_size``) follow its pruned projections."""
    changed = []
    for name, mod in root.named_modules():
        for attr, children in _MLP_LAYOUTS:
            value = int_attribute(mod, attr)
            if value is None:
                continue
            proj = next((getattr(mod, c) for c in children if isinstance(getattr(mod, c, None), nn.Module)), None)
            width = out_width(proj)
            if not isinstance(value, bool) and width is not None and width != value:
                setattr(mod, attr, width)
                changed.append(name)
    return changed


def int_attribute(mod: nn.Module, name: str) -> int | None:
    """``getattr(mod, name)`` when it is an int, else None; without a failing ``nn.Module.__getattr__`` (which
    raises and catches an AttributeError: most of the cost of scanning every module for six layouts)."""
    if name in mod.__dict__:
        value = mod.__dict__[name]
    elif hasattr(type(mod), name):  # a class attribute or a property
        value = getattr(mod, name, None)
    else:
        return None  # nn.Module.__getattr__ only finds parameters, buffers and submodules: never an int
    return value if isinstance(value, int) else None


def out_width(q: nn.Module | None) -> int | None:
    """Output width of a Linear or of Hugging Face's Conv1D (which keeps its weight as [in, out]); else None."""
    if isinstance(q, nn.Linear):
        return q.out_features
    w = getattr(q, "weight", None)  # HF Conv1D keeps [in, out]
    if w is not None and w.dim() == 2 and type(q).__name__ == "Conv1D":
        return int(w.shape[1])
    return None
