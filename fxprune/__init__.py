"""fxprune: structured pruning as a torch.fx compiler pass.

    small = fxprune.compile(model, ratio=0.5, example_inputs=(torch.randn(1, 3, 224, 224),), onnx="small.onnx")
"""

from fxprune.api import Analysis, PruneResult, analyze, apply, compile, prune
from fxprune.sensitivity import SensitivityResult, sensitivity
from fxprune.errors import (
    ExportError,
    FxPruneError,
    InvariantError,
    PlanMismatchError,
    ShapeError,
    TraceError,
    UnsupportedOpError,
)
from fxprune.passes.importance import GroupTensors, MemberSlice, Taylor
from fxprune.plan import ChannelGroup, PruningPlan

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "ChannelGroup",
    "ExportError",
    "GroupTensors",
    "MemberSlice",
    "Taylor",
    "FxPruneError",
    "InvariantError",
    "PlanMismatchError",
    "PruneResult",
    "PruningPlan",
    "SensitivityResult",
    "ShapeError",
    "TraceError",
    "UnsupportedOpError",
    "analyze",
    "apply",
    "compile",
    "prune",
    "sensitivity",
]
