"""fxprune: structured pruning as a torch.fx compiler pass.

    small = fxprune.compile(model, ratio=0.5, example_inputs=(torch.randn(1, 3, 224, 224),), onnx="small.onnx")

The public names are imported on first use (PEP 562), so ``import fxprune`` and ``fxprune --help`` do not
pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Analysis", "PruneResult", "analyze", "apply", "compile", "prune"), "fxprune.api"),
    **dict.fromkeys(("ArgumentError", "ExportError", "FxPruneError", "InvariantError", "ModelLoadError",
                     "PlanMismatchError", "QuantizationError", "ShapeError", "TraceError", "TrainModeError"),
                    "fxprune.errors"),
    **dict.fromkeys(("Activations", "GroupTensors", "MemberSlice", "Taylor"), "fxprune.passes.importance"),
    **dict.fromkeys(("ChannelGroup", "PruningPlan"), "fxprune.plan"),
    **dict.fromkeys(("EpochMetrics", "IterativeResult", "IterativeStep", "finetune", "iterative",
                     "recalibrate_batchnorm"), "fxprune.recovery"),
    **dict.fromkeys(("SensitivityResult", "sensitivity"), "fxprune.sensitivity_analysis"),
    **dict.fromkeys(("DepthResult", "prune_depth"), "fxprune.depth"),
    "GraphDepthResult": "fxprune.depth_graph",
    **dict.fromkeys(("StreamResult", "prune_pretrained"), "fxprune.streaming"),
    "export_onnx": "fxprune.passes.export",
}
_SUBMODULES = ("recovery", "sparsity")

__all__ = [
    "Activations",
    "Analysis",
    "ArgumentError",
    "ChannelGroup",
    "DepthResult",
    "EpochMetrics",
    "ExportError",
    "FxPruneError",
    "GraphDepthResult",
    "GroupTensors",
    "InvariantError",
    "IterativeResult",
    "IterativeStep",
    "MemberSlice",
    "ModelLoadError",
    "PlanMismatchError",
    "PruneResult",
    "PruningPlan",
    "QuantizationError",
    "SensitivityResult",
    "ShapeError",
    "StreamResult",
    "Taylor",
    "TraceError",
    "TrainModeError",
    "analyze",
    "apply",
    "compile",
    "export_onnx",
    "finetune",
    "iterative",
    "prune",
    "prune_depth",
    "prune_pretrained",
    "recalibrate_batchnorm",
    "recovery",
    "sensitivity",
    "sparsity",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fxprune.{name}")
    else:
        raise AttributeError(f"module 'fxprune' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # the names as static analysis sees them
    from fxprune import recovery, sparsity
    from fxprune.api import Analysis, PruneResult, analyze, apply, compile, prune
    from fxprune.depth import DepthResult, prune_depth
    from fxprune.depth_graph import GraphDepthResult
    from fxprune.errors import (
        ArgumentError,
        ExportError,
        FxPruneError,
        InvariantError,
        ModelLoadError,
        PlanMismatchError,
        QuantizationError,
        ShapeError,
        TraceError,
        TrainModeError,
    )
    from fxprune.passes.export import export_onnx
    from fxprune.passes.importance import Activations, GroupTensors, MemberSlice, Taylor
    from fxprune.plan import ChannelGroup, PruningPlan
    from fxprune.recovery import (
        EpochMetrics,
        IterativeResult,
        IterativeStep,
        finetune,
        iterative,
        recalibrate_batchnorm,
    )
    from fxprune.sensitivity_analysis import SensitivityResult, sensitivity
    from fxprune.streaming import StreamResult, prune_pretrained
