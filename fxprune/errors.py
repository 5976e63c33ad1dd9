"""The public error hierarchy: every failure fxprune reports on purpose derives from FxPruneError."""

from __future__ import annotations

import re


def first_line(e: BaseException, *, innermost: bool = False, typed: bool = False) -> str:
    """The first non-empty line of an error's message (at most 300 characters), for one-line reports.

    Args:
        e: the error.
        innermost: follow ``__cause__`` to the error that started it (exporters wrap the real one).
        typed: prefix ``Type: ``.
    """
    while innermost and e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # colour codes some libraries put in messages
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:300]
    if typed:
        return f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line or type(e).__name__


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class ArgumentError(FxPruneError, ValueError):
    """A bad argument; the message names it and what to pass."""


class TraceError(FxPruneError):
    """The model could not be captured as an FX graph, even with leaf fallback."""


class ShapeError(FxPruneError):
    """Shape propagation failed: example inputs are missing, of the wrong shape, or the model does not run."""


class PlanMismatchError(FxPruneError):
    """A pruning plan does not fit the model it is applied to."""


class InvariantError(FxPruneError):
    """fxprune broke one of its own invariants (a bug); the message names the node."""


class ExportError(FxPruneError):
    """ONNX export, simplification or the onnxruntime check failed."""


class ModelLoadError(FxPruneError):
    """A model spec (``torchvision:resnet50``, ``file.py:Class``, a saved file) could not be loaded."""


class QuantizationError(FxPruneError):
    """onnxruntime int8 quantisation of a pruned ONNX file failed."""


class TrainModeError(FxPruneError):
    """A pruned GraphModule was called in train mode, but the model's train-mode forward differs from the
    eval-mode graph it was traced as (``F.dropout(training=...)``, an auxiliary output): use ``output="module"``."""
