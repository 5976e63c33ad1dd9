"""A tiny pass protocol in the onnx-ir style: a pass returns the model and whether it changed anything."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx


@dataclass(frozen=True)
class PassResult:
    """The output of a transformation pass.

    Attributes:
        model: the transformed GraphModule.
        modified: True when the pass changed the graph or any parameter.
    """

    model: fx.GraphModule
    modified: bool
