"""A tiny pass protocol in the onnx-ir style: a pass returns the model and whether it changed anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn


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
