"""Physically remove the dropped channels: slice parameters, fix module attributes, rewrite literal sizes."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import InvariantError
from fxprune.passes.base import GraphPass, PassResult, module_tensors, submodule
from fxprune.passes.dependency import DependencyResult
from fxprune.passes.verify import check_shapes
from fxprune.plan import PruningPlan
from fxprune.rules.attributes import fix_attention_attributes
from fxprune.rules.common import node_values
from fxprune.rules.registry import call_spec, fix_attributes, has_trait
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


def kept_indices(deps: DependencyResult, plan: PruningPlan) -> dict[tuple[str, int], np.ndarray]:
    """Kept indices of every space that loses at least one index."""
    sol = deps.solution
    dropped = plan.dropped_mask(sol.n_classes)[sol.labels]  # per element of every space
    starts = np.fromiter(sol.offsets.values(), dtype=np.int64, count=len(sol.offsets))
    ends = starts + np.fromiter((sol.sizes[s] for s in sol.offsets), dtype=np.int64, count=len(sol.offsets))
    before = np.concatenate(([0], np.cumsum(dropped, dtype=np.int64)))  # dropped elements before each id
    hit = np.nonzero(before[ends] > before[starts])[0]  # spaces losing at least one index
    spaces = list(sol.offsets)
    return {spaces[i]: np.nonzero(~dropped[starts[i] : ends[i]])[0] for i in hit.tolist()}


def new_shapes(deps: DependencyResult, kept: dict[tuple[str, int], np.ndarray]) -> dict[str, Shape]:
    """The shape every value must have after pruning."""
    out: dict[str, Shape] = {}
    for value, shape in deps.value_shapes.items():
        out[value] = tuple(len(kept[(value, d)]) if (value, d) in kept else s for d, s in enumerate(shape))
    return out


class RewritePass(GraphPass):
    """Apply a ``PruningPlan`` to the traced model it was computed on (in place on that GraphModule).

    The GraphModule must be a private copy: the caller's model is never handed to this pass.
    Precondition: every value the analysis saw is a node of the graph. Postcondition: the graph is well
    formed and, when ``inputs`` are given, every value has exactly its planned shape (``check_shapes``).
    """

    def __init__(self, deps: DependencyResult, plan: PruningPlan, inputs: tuple[Any, ...] | None = None) -> None:
        self.deps = deps
        self.plan = plan
        self.inputs = inputs
        self.kept = kept_indices(deps, plan)
        self.shapes = new_shapes(deps, self.kept)

    def requires(self, gm: fx.GraphModule) -> None:
        names = {n.name for n in gm.graph.nodes}
        values = (v for v in self.deps.value_shapes if not v.startswith("param:"))
        missing = next((v for v in values if v.split("#")[0] not in names), None)
        if missing is not None:
            raise InvariantError(f"the plan's graph has a value {missing} that this GraphModule lacks")

    def ensures(self, result: PassResult) -> None:
        super().ensures(result)
        if self.inputs is not None:
            with kept_buffers(result.model):  # a forward's state updates are not the check's to keep
                check_shapes(result.model, self.inputs, self.shapes)  # a stale literal names its node

    def call(self, gm: fx.GraphModule) -> PassResult:
        if not self.kept:
            return PassResult(gm, modified=False)
        changed = self._slice_parameters(gm)
        self._mark_kept(gm, True)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self._fix_module(gm, node, changed)
            else:
                rewrite = call_spec(node).literals
                if rewrite is not None:
                    old = [self.deps.value_shapes[v] for v in node_values(node, self.deps.value_shapes)]
                    new = [self.shapes[v] for v in node_values(node, self.deps.value_shapes)]
                    if old:
                        rewrite(node, old, new)
        self._mark_kept(gm, False)
        fix_attention_attributes(gm, self.deps.prune_heads)
        views_to_reshapes(gm)
        return PassResult(gm, modified=True)

    def _mark_kept(self, gm: fx.GraphModule, on: bool) -> None:
        """Record on each node its shape before pruning and the kept indices of its pruned dims, for the literal
        rewriters of its users (``rules/literals.slice_bounds``); ``on=False`` removes the records."""
        for node in gm.graph.nodes:
            node.meta.pop("fxprune_kept", None)
            shape = self.deps.value_shapes.get(node.name, ()) if on else ()
            dims = {d: self.kept[(node.name, d)] for d in range(len(shape)) if (node.name, d) in self.kept}
            if dims:
                node.meta["fxprune_kept"] = (shape, dims)

    def _slice_parameters(self, gm: fx.GraphModule) -> set[str]:
        """Replace every pruned parameter and buffer by its kept slice, in every module that holds it. Each
        old tensor is let go as soon as its slice replaces it (this pass holds no reference to it after), so
        a large model's peak is its size plus one tensor's slice, not twice its size."""
        owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
        by_name: dict[str, torch.Tensor] = {}
        names: dict[int, list[str]] = {}
        for m in module_tensors(gm):
            owners.setdefault(id(m.tensor), []).append((m.module, m.attr, m.module_name))
            names.setdefault(id(m.tensor), []).append(m.name)
            by_name[m.name] = m.tensor
        changed: set[str] = set()
        for value, qual in self.deps.params.items():
            if qual not in by_name:  # an alias of a tensor already replaced under another name
                continue
            t = by_name[qual]
            dims = [(d, self.kept[(value, d)]) for d in range(t.dim()) if (value, d) in self.kept]
            if not dims:
                continue
            with torch.no_grad():
                data = t.detach()
                for d, idx in dims:
                    data = data.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=data.device))
                data = data.contiguous()  # index_select already made a new tensor: no second copy
            if isinstance(t, nn.Parameter):
                new: torch.Tensor = nn.Parameter(data, requires_grad=t.requires_grad)
            else:
                new = data
            for mod, attr, mod_name in owners.pop(id(t)):
                if isinstance(t, nn.Parameter):
                    mod._parameters[attr] = new  # type: ignore[assignment]
                else:
                    mod._buffers[attr] = new
                changed.add(mod_name)
            for name in names.pop(id(t)):
                del by_name[name]
            del t, data, new
        return changed

    def _fix_module(self, gm: fx.GraphModule, node: fx.Node, changed: set[str]) -> None:
        x = node.args[0] if node.args else None
        new_in = None
        if isinstance(x, fx.Node) and x.name in self.shapes:
            mod = submodule(gm, str(node.target))
            if isinstance(mod, nn.modules.conv._ConvNd):
                cd = len(self.shapes[x.name]) - len(mod.kernel_size) - 1
                new_in = self.shapes[x.name][cd]
            elif isinstance(mod, nn.modules.instancenorm._InstanceNorm) and len(self.shapes[x.name]) > 1:
                new_in = self.shapes[x.name][1]
        if str(node.target) in changed or new_in is not None:
            mod = submodule(gm, str(node.target))
            fix_attributes(mod, new_in)
            _check_divisible(node, mod)


def _check_divisible(node: fx.Node, mod: nn.Module) -> None:
    if isinstance(mod, nn.modules.conv._ConvNd) and (
        mod.in_channels % mod.groups or mod.out_channels % mod.groups
    ):
        raise InvariantError(
            f"{node.format_node()}: channels {mod.in_channels}->{mod.out_channels} not divisible by groups={mod.groups}"
        )



def _writes(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place op, ``inplace=True``, ``out=``)."""
    if node.kwargs.get("inplace") or "out" in node.kwargs:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        return has_trait(node, "in_place") or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        return bool(getattr(submodule(gm, str(node.target)), "inplace", False))
    return False


def views_to_reshapes(gm: fx.GraphModule) -> int:
    """Turn ``x.view(sizes)`` into ``x.reshape(sizes)`` where nothing writes in place into ``x`` or the view.

    A pruned tensor can change memory layout: a conv output left with one channel has ambiguous strides, torch
    picks channels-last for it, and a ``view`` that worked on the original fails (fuzz seed 43156). ``reshape``
    returns the same values (a view whenever one exists); only aliasing differs, which matters only for
    in-place writes, so those keep their ``view``.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_method" or node.target != "view" or len(node.args) < 2:
            continue
        if isinstance(node.args[1], torch.dtype) or "dtype" in node.kwargs:
            continue  # a dtype view reinterprets bytes: no reshape equivalent
        base = node.args[0]
        users = [*node.users, *(base.users if isinstance(base, fx.Node) else [])]
        if any(_writes(u, gm) for u in users):
            continue
        node.target = "reshape"
        changed += 1
    return changed
