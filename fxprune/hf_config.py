"""Keep a Hugging Face model's config in step with its pruned widths (``output="module"``).

A pruned ``PreTrainedModel`` still carries its original config. ``save_pretrained`` would then write a
checkpoint that ``from_pretrained`` cannot load (every pruned weight has the wrong shape). fxprune rewrites the
config fields that can describe the pruned model: the MLP width (``intermediate_size``, GPT-2's ``n_inner``,
OPT's ``ffn_dim``, half of Phi-3's fused ``gate_up_proj``), a MoE model's ``shared_expert_intermediate_size``
and expert width (``moe_intermediate_size``) and, for attention with an explicit head dim (Llama, Mistral,
Qwen, Gemma, Phi-3's fused ``qkv_proj``), ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``.
BERT, ViT, GPT-2, GPT-NeoX and OPT derive the head size and the attention width from ``hidden_size``: their
configs can only describe head counts when heads x head size equals the hidden size.

A proposal is written only when it is proven three ways:

1. A model built from the new config on the meta device has exactly the pruned model's parameter names and
   shapes, so ``from_pretrained`` loads the checkpoint.
2. Every number attribute of every module (head counts, head dims, split sizes, attention scales) equals
   the pruned model's: a config that re-derives the scale from a thinned head dim is refused.
3. The pruned model gives the same outputs before and after the config change (some forwards read the
   config at run time).

A forward that reads the config at run time (Phi-3) is written back with the new config already in place
(``config_follows``): there the write-back's own proof, equal outputs to the pruned graph, is the third.

Anything the config cannot describe is left as it was, and a warning says why. The model still works and
saves with ``torch.save``.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from fxprune.outputs import tensors_of
from fxprune.rules.attributes import out_width

log = logging.getLogger(__name__)

_MISSING = object()  # a config field the config did not have before
_MLP_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")
# (config fields, the first present is written; module name pattern; how many inner widths its output holds)
_MLP_WIDTHS: tuple[tuple[tuple[str, ...], re.Pattern[str], int], ...] = (
    (_MLP_FIELDS, re.compile(r"(intermediate\.dense|mlp\.(c_fc|up_proj|fc1|dense_h_to_4h)|layers?\.\d+\.fc1)$"), 1),
    (_MLP_FIELDS, re.compile(r"mlp\.gate_up_proj$"), 2),  # Phi-3: gate and up in one Linear
    (("shared_expert_intermediate_size",), re.compile(r"mlp\.shared_expert\.up_proj$"), 1),  # Qwen2-MoE
    (("moe_intermediate_size", "intermediate_size"), re.compile(r"mlp\.experts$"), 1),  # fused experts [E, H, I]
)


def _one(values: list[int]) -> int | None:
    return values[0] if values and len(set(values)) == 1 else None


def propose(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Config changes that describe ``model``'s widths, and why other widths cannot be described."""
    cfg = model.config  # type: ignore[union-attr]
    fields = cfg.to_dict()
    changes: dict[str, int] = {}
    why: list[str] = []
    mods = list(model.named_modules())
    hidden = _hidden_width(model)
    hidden_field = next((f for f in ("hidden_size", "n_embd", "d_model") if f in fields), None)
    if hidden is not None and hidden_field is not None and hidden != fields[hidden_field]:
        changes[hidden_field] = hidden
    new_hidden = changes.get(hidden_field or "", fields.get(hidden_field or ""))
    for field, widths in _mlp_widths(mods, fields).items():
        width = _one(widths)
        if width is None:
            why.append(f"{field} differs between layers ({sorted(set(widths))})")
        elif width != fields[field]:
            changes[field] = width

    explicit = [(m.head_dim, *h) for _, m in mods if (h := _explicit_heads(m)) is not None]
    derived = [m for _, m in mods if isinstance(getattr(m, "attention_head_size", None), int)]
    neox = [m for _, m in mods if isinstance(getattr(m, "head_size", None), int)
            and out_width(getattr(m, "query_key_value", None)) is not None]
    if explicit:
        hd, heads, kv = (_one([e[i] for e in explicit]) for i in range(3))
        if None in (hd, heads, kv):
            why.append("attention heads differ between layers")
        else:
            for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv), ("head_dim", hd)):
                if name in fields and fields[name] != value:
                    changes[name] = value  # type: ignore[assignment]
            if "head_dim" not in fields and hd != (new_hidden or 0) // heads:  # type: ignore[operator]
                # Qwen2 and others read ``getattr(config, "head_dim", hidden // heads)``: write the field; the
                # proofs below refuse it if the model does not read it.
                changes["head_dim"] = hd  # type: ignore[assignment]
    elif derived:
        heads = _one([m.num_attention_heads for m in derived])
        size = _one([m.attention_head_size for m in derived])
        if heads is None or size is None:
            why.append("attention heads differ between layers")
        elif heads * size == new_hidden:
            if heads != fields.get("num_attention_heads"):
                changes["num_attention_heads"] = heads
        else:
            why.append(f"attention is {heads} heads x {size}, but the config derives the head size from "
                       f"hidden_size {new_hidden}")
    elif neox:  # GPT-NeoX: query_key_value holds 3 x hidden_size, head_size = hidden_size // heads
        width = _one([out_width(m.query_key_value) for m in neox])
        if width != 3 * (new_hidden or 0):
            why.append(f"attention is {width} wide (q, k and v), but the config derives it from hidden_size "
                       f"{new_hidden}")
    else:
        split = [m for _, m in mods if isinstance(getattr(m, "split_size", None), int) and hasattr(m, "embed_dim")]
        if any(m.split_size != m.embed_dim for m in split):
            why.append("attention width differs from the hidden size, which the config derives it from")
    return changes, why


def _explicit_heads(m: nn.Module) -> tuple[int, int] | None:
    """(query heads, key/value heads) of an attention with an explicit ``head_dim``: separate q/k projections
    (Llama), or Phi-3's fused ``qkv_proj`` (q as wide as ``o_proj``'s input, then k and v); else None."""
    hd = getattr(m, "head_dim", None)
    if not isinstance(hd, int) or hd <= 0:
        return None
    q, k = out_width(getattr(m, "q_proj", None)), out_width(getattr(m, "k_proj", None))
    if q is not None and k is not None:
        return q // hd, k // hd
    qkv, o = out_width(getattr(m, "qkv_proj", None)), getattr(m, "o_proj", None)
    if qkv is None or not isinstance(o, nn.Linear):
        return None
    return o.in_features // hd, (qkv - o.in_features) // (2 * hd)


def _mlp_widths(mods: list[tuple[str, nn.Module]], fields: dict[str, Any]) -> dict[str, list[int]]:
    """The inner MLP widths of every layer, by the config field that describes them."""
    widths: dict[str, list[int]] = {}
    for candidates, pattern, share in _MLP_WIDTHS:
        field = next((f for f in candidates if f in fields), None)
        if field is None:
            continue
        for name, m in mods:
            if pattern.search(name) and (w := _inner_width(m)) is not None:
                widths.setdefault(field, []).append(w // share)
    return widths


def _inner_width(m: nn.Module) -> int | None:
    """Output width of a projection; for fused experts (3D ``down_proj`` [experts, hidden, inner]) the inner one."""
    down = getattr(m, "down_proj", None)
    if isinstance(down, nn.Parameter) and down.dim() == 3:
        return int(down.shape[-1])
    return out_width(m)


def _hidden_width(model: nn.Module) -> int | None:
    """Width of the residual stream: what the input embedding (tokens or patches) produces."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - a model without one
        return None
    if isinstance(emb, nn.Embedding):
        return emb.embedding_dim
    proj = getattr(emb, "projection", None)
    return proj.out_channels if isinstance(proj, nn.Conv2d) else None


def _same_structure(model: nn.Module, config: Any) -> str:
    """"" when a model built from ``config`` has ``model``'s parameter shapes and number attributes."""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as e:  # noqa: BLE001 - any construction failure means the config does not describe it
        return f"the new config does not build ({type(e).__name__}: {e})"
    return built_mismatch(model, fresh)


def built_mismatch(model: nn.Module, fresh: nn.Module) -> str:
    """How ``fresh`` (built from a new config) differs from ``model``: a parameter shape or a numeric
    attribute of a module ("" when it describes the model)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:3]
        return f"a model built from it differs in {bad}"
    built = dict(fresh.named_modules())
    for name, m in model.named_modules():
        other = built.get(name)
        for attr, value in vars(m).items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and other is not None
                    and getattr(other, attr, value) != value):
                return f"{name}.{attr} would be {getattr(other, attr)}, the pruned model has {value}"
    return ""


def sync_config(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[str]:
    """Rewrite ``model.config`` in place to describe its pruned widths; returns what could not be described."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(type(model), "config_class"):
        return []
    changes, why = propose(model)
    if changes:
        new = copy.deepcopy(cfg)
        for k, v in changes.items():
            setattr(new, k, v)
        problem = _same_structure(model, new)
        if not problem:
            old = {k: getattr(cfg, k, _MISSING) for k in changes}
            with torch.no_grad():
                before = tensors_of(model(*example_inputs))
                for k, v in changes.items():
                    setattr(cfg, k, v)
                try:
                    after = tensors_of(model(*example_inputs))
                    same = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
                except Exception:  # noqa: BLE001 - a forward that breaks on the new config: revert
                    same = False
            if not same:
                _restore(cfg, old)
                problem = "the model's forward reads the config and changes with it"
        if problem:
            why.append(f"config changes {changes} not written: {problem}")
        else:
            log.info("fxprune: config updated: %s", changes)
    for reason in why:
        log.warning("fxprune: the %s config cannot describe the pruned model: %s; save it with torch.save",
                    type(model).__name__, reason)
    return why


def config_follows(work: nn.Module, prove: Callable[[], None]) -> bool:
    """Write the pruned widths into the config of the Hugging Face model in ``work`` (``propose``, proven to
    build the same parameters and module numbers), then run ``prove``; the config is restored, and False
    returned, when no change applies or ``prove`` raises. For forwards that read the config at run time (Phi-3
    slices its fused ``qkv_proj`` at ``config.num_attention_heads * head_dim``)."""
    model = next((m for m in work.modules() if hasattr(getattr(m, "config", None), "to_dict")
                  and hasattr(type(m), "config_class")), None)
    if model is None:
        return False
    cfg = model.config  # type: ignore[union-attr]
    changes, _ = propose(model)
    new = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(new, k, v)
    if not changes or _same_structure(model, new):
        return False
    old = {k: getattr(cfg, k, _MISSING) for k in changes}
    for k, v in changes.items():
        setattr(cfg, k, v)
    try:
        prove()
    except Exception:  # noqa: BLE001 - any failure: the config stays as it was
        _restore(cfg, old)
        return False
    log.info("fxprune: config updated for the model's own forward: %s", changes)
    return True


def _restore(cfg: Any, old: dict[str, Any]) -> None:
    for k, v in old.items():
        if v is _MISSING:
            delattr(cfg, k)
        else:
            setattr(cfg, k, v)
