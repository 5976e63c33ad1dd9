"""A tiny pass protocol in the onnx-ir style: a pass returns the model and whether it changed anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
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


class ModuleTensor(NamedTuple):
    """One parameter or buffer under one of its qualified names."""

    name: str  # qualified name, ``layer1.0.conv1.weight``
    module_name: str
    module: nn.Module
    attr: str
    tensor: torch.Tensor
    is_parameter: bool


def module_tensors(root: nn.Module) -> list[ModuleTensor]:
    """Every parameter and buffer under ``root``, a shared module's under each of its names, module by module
    (its parameters, then its buffers).

    What ``named_parameters``/``named_buffers(remove_duplicate=False)`` give, in one walk of the modules'
    ``_parameters``/``_buffers`` tables, without torch's generator chain per module and per call.
    """
    out: list[ModuleTensor] = []
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for table, is_parameter in ((mod._parameters, True), (mod._buffers, False)):
            for attr, t in table.items():
                if t is not None:
                    out.append(ModuleTensor(prefix + attr, mod_name, mod, attr, t, is_parameter))
    return out


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
