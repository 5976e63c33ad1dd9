"""A tiny pass protocol in the onnx-ir style: a pass returns the model and whether it changed anything."""

from __future__ import annotations

from dataclasses import dataclass

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
