"""A fingerprint of a traced graph: which ops, in which order, on which shapes, with which parameters."""

from __future__ import annotations

import hashlib

import torch.fx as fx

from fxprune.passes.base import submodule
from fxprune.passes.dependency import DependencyResult


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target}:{type(submodule(gm, str(node.target))).__name__}"
    if node.op == "call_function":
        return getattr(node.target, "__qualname__", str(node.target))
    return str(node.target)


def graph_fingerprint(gm: fx.GraphModule, deps: DependencyResult) -> str:
    """sha256 over node ops, targets and shapes and parameter shapes; stable across processes."""
    h = hashlib.sha256()
    for node in gm.graph.nodes:
        h.update(f"{node.op}|{_target_name(node, gm)}|{deps.value_shapes.get(node.name)}\n".encode())
    for value in sorted(deps.params):
        h.update(f"{value}|{deps.value_shapes[value]}\n".encode())
    return h.hexdigest()[:16]
