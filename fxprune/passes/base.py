"""A tiny pass protocol in the onnx-ir style: a pass returns the model and whether it changed anything."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

try:  # torch's deferred-codegen GraphModule (used by Dynamo and Inductor for the same reason)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older or newer torch without it: generate code eagerly
    _LazyGraphModule = None


@dataclass(frozen=True)
class PassResult:
    """The output of a transformation pass.

    Attributes:
        model: the transformed GraphModule.
        modified: True when the pass changed the graph or any parameter.
    """

    model: fx.GraphModule
    modified: bool


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)`` by walking ``_modules`` directly (torch's version is about 10x slower,
    and every pass looks up the module of every ``call_module`` node)."""
    mod = root
    try:
        for part in target.split(".") if target else ():
            mod = mod._modules[part]  # type: ignore[assignment]
    except KeyError:
        return root.get_submodule(target)  # torch's own error names the missing part
    if mod is None:
        return root.get_submodule(target)
    return mod


def deferred_graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use, not at construction.

    The passes between tracing and the rewrite only interpret the graph (shape runs, rules), and each
    ``recompile`` of an unchanged graph is wasted work: code generation and ``compile`` take ~30 ms on a
    700-node graph. Calling the module, reading ``.code``, printing, copying or pickling it still generate
    the code first, so nothing can observe a stale forward. ``generated`` turns it into a plain GraphModule.
    """
    if _LazyGraphModule is None:
        return fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def generated(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as a plain ``fx.GraphModule`` with its code generated now (the form a user receives).

    A deferred module is switched in place to its own singleton GraphModule class, the form
    ``fx.GraphModule.__new__`` gives every instance; its state (submodules, parameters, meta) is untouched.
    """
    if _LazyGraphModule is not None and isinstance(gm, _LazyGraphModule):
        gm.__class__ = type("GraphModuleImpl", (fx.GraphModule,), {"__module__": fx.GraphModule.__module__})
        gm.recompile()
    return gm
