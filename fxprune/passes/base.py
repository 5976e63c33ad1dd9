"""The pass protocol, in the onnx-ir style, and helpers every pass uses.

A transformation of a GraphModule is a ``GraphPass``: it says whether it works in place, and calling it
checks its precondition (``requires``), runs it (``call``), checks that an in-place pass returned the
module it was given, and, when it changed anything, checks its postcondition (``ensures``) and marks the
code for regeneration. Every pass returns a ``PassResult``. Analyses (shapes, dependencies, the eager
and train-mode checks) do not transform the graph; they return frozen records instead.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import InvariantError


@dataclass(frozen=True)
class PassResult:
    """The output of a transformation pass.

    Attributes:
        model: the transformed GraphModule.
        modified: True when the pass changed the graph or any parameter.
        changes: what changed, one short entry per change (lowered modules, ...).
    """

    model: fx.GraphModule
    modified: bool
    changes: tuple[str, ...] = ()


class GraphPass(abc.ABC):
    """A graph transformation: subclasses implement ``call`` and may refine ``requires``/``ensures``."""

    in_place: ClassVar[bool] = True
    """True when the pass edits the GraphModule it is given (and returns it); False when it builds another."""

    def requires(self, gm: fx.GraphModule) -> None:
        """Precondition on the input; raise ``InvariantError`` when it does not hold. Default: none."""
        return None

    def ensures(self, result: PassResult) -> None:
        """Postcondition on a modified result. Default: the graph is well formed (``Graph.lint``)."""
        result.model.graph.lint()

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult:
        """Run the pass."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if self.in_place and result.model is not gm:
            raise InvariantError(f"{type(self).__name__} is in place but returned another module")
        if result.modified:
            self.ensures(result)
            result.model.recompile()  # a deferred GraphModule only marks its code stale
        return result


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
