"""Say when a request ended up doing nothing: a compile that removed nothing, heads asked for and none
removed, a hidden size that stayed, calibration that reached no part.

An option that silently does nothing is as serious as a wrong output, so these are warnings printed by
default (``logging.WARNING``) and kept on the result (``PruneResult.unhonoured``); the command line's
``--strict`` turns them into a non-zero exit.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Any

import torch.nn as nn

from fxprune.options import Options
from fxprune.results import PruneResult

log = logging.getLogger(__name__)

# Attributes that count attention heads, on modules and on Hugging Face configs.
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads")


def head_counts(model: nn.Module) -> dict[str, int]:
    """``owner.attribute -> value`` of every integer head count on ``model``'s modules and their configs."""
    out: dict[str, int] = {}
    for name, m in model.named_modules():
        for owner, obj in ((name, m), (f"{name}.config" if name else "config", getattr(m, "config", None))):
            for attr in _HEAD_COUNTS:
                v = getattr(obj, attr, None) if obj is not None else None
                if isinstance(v, int) and not isinstance(v, bool):
                    out[f"{owner}.{attr}"] = v
    return out


def pin_summary(result: PruneResult, top: int = 3) -> str:
    """The most common reasons channels were kept, across the plan's groups and the skipped parts."""
    reasons: Counter[str] = Counter(g.reason for g in result.plan.groups if not g.prunable)
    reasons.update(f"part {p.name}: {p.skipped}" for p in result.parts if p.skipped)
    if not reasons:
        return "no group could lose a channel at this ratio"
    return "; ".join(f"{r} ({n}x)" if n > 1 else r for r, n in reasons.most_common(top))


def unhonoured(model: nn.Module, options: Options, result: PruneResult, heads_before: dict[str, int]) -> tuple[str, ...]:
    """What was asked for and not done, one sentence each (empty when everything was honoured)."""
    notes: list[str] = []
    asked = options.ratio > 0 or options.budget or bool(options.ratios) or bool(options.group_ratios)
    if (asked or options.hidden) and result.params_after >= result.params_before:
        notes.append(f"nothing was pruned: {pin_summary(result)}; fxprune.analyze(model, inputs) lists every group")
    if options.prune_heads and asked and heads_before and result.params_after < result.params_before:
        counts = {k: v for k, v in heads_before.items() if not k.startswith(_PARAMS)}
        sizes = {k[len(_PARAMS):]: v for k, v in heads_before.items() if k.startswith(_PARAMS)}
        after, modules = head_counts(result.model), dict(result.model.named_modules())
        # Heads went when an attention module lost parameters (with prune_heads=True they go whole), or when
        # a head count went down; a config a part left unsynced (a GraphModule's opaque part) cannot say.
        shrank = any(sum(p.numel() for p in modules[n].parameters()) < v for n, v in sizes.items() if n in modules)
        if not shrank and not any(after.get(k, v) < v for k, v in counts.items()):
            opaque = [r for r in pin_summary(result, top=10).split("; ") if "attn" in r or "attention" in r]
            why = opaque[0] if opaque else "no attention reshape could be traced into heads, or too few heads"
            notes.append(f"prune_heads={options.prune_heads!r} removed no attention head ({why})")
    if getattr(options, "reconstruct", False) and result.params_after < result.params_before \
            and not result.reconstruction:
        notes.append("reconstruct=True refitted no layer: no layer it can refit (a Linear, a Conv1D, an ungrouped "
                     "zero-padded conv, each with its own weight) reads a removed channel")
    if options.hidden and result.params_after < result.params_before:
        before, after = hidden_size(model), hidden_size(result.model)
        if before is not None and after == before:
            notes.append(f"hidden={options.hidden} left the hidden size at {before}")
    return tuple(notes)


def hidden_size(model: nn.Module) -> int | None:
    """A Hugging Face model's hidden size from its config (None for other models)."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def report(model: nn.Module, options: Options, result: PruneResult, heads_before: dict[str, int]) -> PruneResult:
    """``result`` with its unhonoured requests recorded, each logged as a warning."""
    notes = unhonoured(model, options, result, heads_before)
    for note in notes:
        log.warning("fxprune: %s", note)
    return replace(result, unhonoured=notes) if notes else result


_PARAMS = "#params:"


def snapshot(model: Any) -> dict[str, int]:
    """The head counts, and the parameter count of every module that holds one (``#params:<name>``), to
    compare against after the compile (read-only on the caller's model)."""
    if not isinstance(model, nn.Module):
        return {}
    counts = head_counts(model)
    modules = dict(model.named_modules())
    attention = [n for n, m in modules.items() if n and ("attention" in type(m).__name__.lower()
                                                         or n.rpartition(".")[2] in ("attn", "self_attn"))]
    sizes = {f"{_PARAMS}{n}": sum(p.numel() for p in modules[n].parameters()) for n in attention}
    return {**counts, **sizes}


_WEIGHT_ONLY = ("l2", "l1", "lamp", "random", "bn_scale")


def warn_weight_only_language_model(model: nn.Module, options: Options) -> None:
    """One warning when a Hugging Face language model is pruned by its weights alone, with no calibration:
    the criterion the structured-pruning literature finds collapses these models (FLAP and LLM-Pruner report
    LLaMA-7B's perplexity going from about 12.6 to several hundred at 20% of the parameters by L2 magnitude)."""
    is_lm = callable(getattr(model, "generate", None)) and callable(getattr(model, "get_input_embeddings", None))
    weight_only = options.importance is None or options.importance in _WEIGHT_ONLY
    if is_lm and weight_only and options.calibration is None and (options.ratio or options.budget or options.hidden):
        log.warning("fxprune: pruning a language model by weight magnitude alone: published measurements find it "
                    "collapses them (LLaMA-7B, 20% of the parameters: perplexity about 12.6 -> several hundred); "
                    "pass calibration=<batches of your tokenised text> (activation-aware by default) and "
                    "reconstruct=True, or on the command line --data FILE --reconstruct")
