"""fxprune: structured pruning as a torch.fx compiler pass.

    small = fxprune.compile(model, ratio=0.5, example_inputs=(torch.randn(1, 3, 224, 224),), onnx="small.onnx")
"""

from fxprune import recovery, sparsity
from fxprune.api import Analysis, PruneResult, analyze, apply, compile, prune
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
    UnsupportedOpError,
)
from fxprune.passes.importance import GroupTensors, MemberSlice, Taylor
from fxprune.plan import ChannelGroup, PruningPlan
from fxprune.recovery import (
    EpochMetrics,
    IterativeResult,
    IterativeStep,
    finetune,
    iterative,
    recalibrate_batchnorm,
)
from fxprune.sensitivity import SensitivityResult, sensitivity

__version__ = "0.1.0"

__all__ = [
    "EpochMetrics",
    "IterativeResult",
    "IterativeStep",
    "finetune",
    "iterative",
    "recalibrate_batchnorm",
    "recovery",
    "sparsity",
    "Analysis",
    "ArgumentError",
    "ChannelGroup",
    "ExportError",
    "GroupTensors",
    "MemberSlice",
    "Taylor",
    "FxPruneError",
    "InvariantError",
    "ModelLoadError",
    "PlanMismatchError",
    "QuantizationError",
    "PruneResult",
    "PruningPlan",
    "SensitivityResult",
    "ShapeError",
    "TraceError",
    "TrainModeError",
    "UnsupportedOpError",
    "analyze",
    "apply",
    "compile",
    "prune",
    "sensitivity",
]
