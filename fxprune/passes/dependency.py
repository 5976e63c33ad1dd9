"""Build and solve the channel-dependency graph of a traced model."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.depgraph import DependencyGraph, Solution, SpaceKey, param_value, space_label
from fxprune.passes.base import module_tensors, submodule
from fxprune.rules import lookup
from fxprune.rules.common import pin_all, values_of
from fxprune.rules.context import Regroup, RuleContext
from fxprune.rules.registry import has_trait

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DependencyResult:
    """The solved dependencies of one traced model (analysis only; nothing is modified).

    Attributes:
        couplings: the channel-dependency graph (spaces, couplings, pins, producers).
        solution: channel classes and coupled groups.
        value_shapes: shape of every tensor value and parameter referenced.
        params: canonical parameter/buffer name per value name ``param:<name>``.
        prune_heads: whole attention heads are the unit (``build_dependencies``).
        pinned: ``(parameter name, dim, reason)`` pinned by the caller (``build_dependencies``).
    """

    couplings: DependencyGraph
    solution: Solution
    value_shapes: dict[str, Shape]
    params: dict[str, str]
    prune_heads: bool | str = False
    pinned: tuple[tuple[str, int, str], ...] = ()


def canonical_names(gm: nn.Module) -> dict[int, str]:
    """Map ``id(tensor)`` of every parameter and buffer to its first qualified name (tied weights share one)."""
    tensors = module_tensors(gm)
    names: dict[int, str] = {}
    for is_parameter in (True, False):  # every parameter before any buffer, as named_parameters does
        for m in tensors:
            if m.is_parameter == is_parameter:
                names.setdefault(id(m.tensor), m.name)
    return names


def _matches(name: str, module: nn.Module, ignore: Iterable[str | type]) -> bool:
    for item in ignore:
        if isinstance(item, str) and (name == item or name.startswith(item + ".")):
            return True
        if isinstance(item, type) and isinstance(module, item):
            return True
    return False


def build_dependencies(
    gm: fx.GraphModule,
    value_shapes: dict[str, Shape],
    ignore: Iterable[str | type] = (),
    opaque: dict[str, str] | None = None,
    prune_heads: bool | str = False,
    pinned: tuple[tuple[str, int, str], ...] = (),
) -> DependencyResult:
    """Apply the rule of every node, resolve reshapes, and solve the couplings.

    Args:
        gm: the traced model.
        value_shapes: output of shape propagation (``passes/shapes.py``).
        ignore: module names (prefixes) or types whose channels must not be pruned.
        opaque: submodules kept opaque by the tracer, with the reason (used in pin messages).
        prune_heads: a reshape into or out of attention heads couples its head-count factor instead of
            its head-dim factor, so whole heads are removed and every head keeps its width. ``"query"``:
            where query heads share key/value heads (grouped-query attention), every key/value head stays
            and the same query heads go from each group (the repeat of the keys couples its copy factor).
        pinned: parameter dims whose channels must stay, ``(qualified name, dim, reason)``: the residual
            stream once ``hidden=`` has chosen its width (a name the graph does not use is skipped).
    """
    ignore = list(ignore)
    opaque = opaque or {}
    dep = DependencyGraph()
    ctx = RuleContext(gm, dep, canonical_names(gm))
    ctx.value_shapes = dict(value_shapes)
    ctx.query_heads = prune_heads == "query"
    for node in gm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            for v in values_of(node, ctx):
                ctx.pin(v, "model input")
        elif node.op == "output":
            pin_all(node, ctx, "model output")
        elif node.op == "get_attr":
            _get_attr(node, ctx)
            owner = str(node.target).rpartition(".")[0]
            if ignore and ctx.out() is not None and _matches(owner, submodule(ctx.gm, owner), ignore):
                pin_all(node, ctx, f"ignored by the user: {owner}")
        else:
            if node.op == "call_module" and str(node.target) in opaque:
                reason = f"opaque module {node.target}: {opaque[str(node.target)]}"
                pin_all(node, ctx, reason)
                _pin_shared_params(node, gm, ctx, reason)
            else:
                lookup(node, gm)(node, ctx)
            if node.op == "call_module":
                mod = submodule(gm, str(node.target))
                if _matches(str(node.target), mod, ignore):
                    _pin_module(node, mod, ctx)
    for name, dim, reason in pinned:
        value = param_value(name)
        if value in ctx.value_shapes:
            ctx.pin(value, reason, [dim])
    heads = frozenset()
    if prune_heads:
        heads = _attention_reshapes(gm, {rg.node for rg in ctx.regroups}, rotary=ctx.query_heads)
    if ctx.query_heads:
        _query_groups(dep, ctx, heads)
    _resolve_regroups(dep, ctx.regroups, heads)
    params = {v: v[len("param:") :] for v in ctx.value_shapes if v.startswith("param:")}
    return DependencyResult(couplings=dep, solution=dep.solve(), value_shapes=ctx.value_shapes, params=params,
                            prune_heads=prune_heads, pinned=tuple(pinned))


def _get_attr(node: fx.Node, ctx: RuleContext) -> None:
    y = ctx.out()
    if y is None:
        return
    owner_name, _, attr = str(node.target).rpartition(".")
    owner = submodule(ctx.gm, owner_name)
    p = ctx.param(owner, attr)
    if p is None:
        ctx.pin(y, f"{node.name}: constant tensor attribute that is not a parameter or buffer")
        return
    for d in range(ctx.ndim(y)):
        ctx.same(y, d, p, d)


def _pin_shared_params(node: fx.Node, gm: fx.GraphModule, ctx: RuleContext, reason: str) -> None:
    """Pin the parameters of an opaque module that are also used outside it (a tied embedding and output
    layer): the opaque forward reads them whole, so no rule outside may slice them."""
    prefix = f"{node.target}."
    outside = {id(p) for n, p in gm.named_parameters(remove_duplicate=False) if not n.startswith(prefix)}
    mod = submodule(gm, str(node.target))
    _pin_tensors(mod, ctx, reason, [(n, t) for n, t in mod.named_parameters(remove_duplicate=False) if id(t) in outside])


def _pin_tensors(mod: nn.Module, ctx: RuleContext, reason: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Pin every dim of the named parameters and buffers of ``mod``."""
    for name, _ in tensors:
        owner_name, _, attr = name.rpartition(".")
        p = ctx.param(mod.get_submodule(owner_name) if owner_name else mod, attr)
        if p is not None:
            ctx.pin(p, reason)


def _pin_module(node: fx.Node, mod: nn.Module, ctx: RuleContext) -> None:
    reason = f"ignored by the user: {node.target}"
    pin_all(node, ctx, reason)
    _pin_tensors(mod, ctx, reason, [*mod.named_parameters(), *mod.named_buffers()])


def _channel_like(sol: Solution, space: SpaceKey) -> bool:
    labs = sol.space_labels(space)
    return bool(np.any((sol.class_group[labs] >= 0) & np.array([not sol.class_pin[i] for i in labs])))


def _free(sol: Solution, space: SpaceKey) -> bool:
    return sol.sizes[space] > 1 and not all(sol.class_pin[i] for i in sol.space_labels(space))


def _couple_factor(dep: DependencyGraph, rg: Regroup, k: int | None) -> None:
    reason = f"{rg.node}: reshape merges/splits dims and only one of them can be pruned"
    if k is None:
        dep.pin(rg.product, reason)
    sizes = rg.factor_sizes
    for j, f in enumerate(rg.factors):
        if j != k:
            dep.pin(f, reason)
    if k is None:
        return
    inner = int(np.prod(sizes[k + 1 :])) if k + 1 < len(sizes) else 1
    f_idx = np.arange(int(np.prod(sizes)))
    dep.couple(rg.product, rg.factors[k], f_idx, (f_idx // inner) % sizes[k], why=rg.node)


def _policy(rg: Regroup, cands: list[int], heads: frozenset[str]) -> int:
    if rg.node in heads and len(cands) >= 2:
        return sorted(cands)[-2]  # (..., heads, head_dim): the factor just outside the innermost one
    # Prefer the largest factor (channels over a small group count; head_dim over heads); ties: innermost.
    return max(cands, key=lambda k: (rg.factor_sizes[k], k))


def _attention_reshapes(gm: fx.GraphModule, names: set[str], rotary: bool = False) -> frozenset[str]:
    """The reshapes (by node name) that reach an attention product through layout ops only, either way
    (``rotary``: also through the elementwise ops of a rotary embedding)."""
    found = set()
    for node in gm.graph.nodes:
        if node.name not in names:
            continue
        seen, frontier = {node}, [node]
        for _ in range(6):
            nxt = []
            for n in frontier:
                for m in [*n.users, *n.all_input_nodes]:
                    if m in seen:
                        continue
                    seen.add(m)
                    if has_trait(m, "attention_product"):
                        found.add(node.name)
                    elif has_trait(m, "head_layout") or (rotary and has_trait(m, "rotary")):
                        nxt.append(m)
            frontier = nxt
    return frozenset(found)


def _query_groups(dep: DependencyGraph, ctx: RuleContext, heads: frozenset[str]) -> None:
    """``prune_heads="query"``: a head reshape that merges key/value heads with the copies an expand made of
    them (``repeat_kv``: ``(kv, rep) -> kv * rep``) couples the copy factor, so query head ``g * rep + r`` is
    coupled with copy ``r`` of every group, and pins the key/value heads."""
    for rg in list(ctx.regroups):
        copies = [k for k, f in enumerate(rg.factors) if f in ctx.expanded and rg.factor_sizes[k] > 1]
        if rg.node in heads and len(copies) == 1:
            for k, f in enumerate(rg.factors):
                if k != copies[0]:
                    dep.pin(f, "prune_heads='query' keeps every key/value head")
            dep.produce(rg.factors[copies[0]])  # the query heads of a group are channels: reshapes seeing them couple them
            _couple_factor(dep, rg, copies[0])
            ctx.regroups.remove(rg)


def _resolve_regroups(dep: DependencyGraph, regroups: list[Regroup], heads: frozenset[str] = frozenset()) -> None:
    """Pick the factor each merge/split couples to: the one that carries channels.

    A factor is a candidate when it is not pinned and longer than 1. Rounds resolve every reshape whose
    candidates already reach a producer (a flatten after a conv couples the conv's channels, not the
    spatial dims); when no round makes progress, reshapes whose product carries channels take the largest
    candidate, and the rest are pinned.
    """
    pending = list(regroups)
    while pending:
        sol = dep.solve()
        progress = False
        waiting: list[Regroup] = []
        for rg in pending:
            cands = [k for k, f in enumerate(rg.factors) if _free(sol, f)]
            chan = [k for k in cands if _channel_like(sol, rg.factors[k])]
            if chan:
                _couple_factor(dep, rg, _policy(rg, chan, heads))
                progress = True
            elif not cands:
                _couple_factor(dep, rg, None)
                progress = True
            else:
                waiting.append(rg)
        if not progress:
            # Nothing resolved from evidence: split the reshapes whose product carries channels by policy,
            # then re-solve so the reshapes downstream of them see the channels. Pin the rest only when
            # none of them carries channels.
            carrying = [rg for rg in waiting if _channel_like(sol, rg.product)]
            for rg in carrying or waiting:
                cands = [k for k, f in enumerate(rg.factors) if _free(sol, f)]
                k = _policy(rg, cands, heads) if carrying else None
                _couple_factor(dep, rg, k)
                log.debug("fxprune: %s couples %s", rg.node, space_label(rg.factors[k]) if k is not None else "nothing")
            waiting = [rg for rg in waiting if carrying and rg not in carrying]
        pending = waiting
