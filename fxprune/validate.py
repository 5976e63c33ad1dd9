"""Checks of what the caller passes in, run before any work: each failure is an ``ArgumentError`` that names
the bad argument and what to pass instead, never a crash deep inside a pass."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import ArgumentError, ShapeError
from fxprune.plan import PruningPlan

__all__ = [
    "check_example_inputs",
    "check_forward_runs",
    "check_model",
    "check_output_path",
    "check_scores",
    "example_inputs_message",
    "forward_arity",
    "plan_argument",
]


def check_model(model: Any) -> None:
    """Refuse a model fxprune cannot analyse: not an ``nn.Module``, a TorchScript module, meta buffers.

    Args:
        model: what the caller passed as the model.

    Raises:
        ArgumentError: the model is not an eager ``nn.Module`` with real tensors.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ArgumentError(
            f"model is a TorchScript module ({type(model).__name__}): script modules cannot be traced by "
            "torch.fx; pass the eager nn.Module (the one given to torch.jit.script)"
        )
    for name, b in model.named_buffers():
        if b.is_meta:
            raise ArgumentError(
                f"buffer {name} is on the meta device: fxprune runs the model to find its shapes and "
                "needs real buffers; initialise the model on a real device (or model.to_empty(device='cpu') "
                "and then load_state_dict) first"
            )


def forward_arity(model: nn.Module) -> tuple[int, int | None, list[str]] | None:
    """The positional inputs the model's ``forward`` accepts, as torch.fx calls it.

    Args:
        model: an ``nn.Module``.

    Returns:
        ``(required, maximum, names)``: the number of positional parameters without a default, the
        number of positional parameters (None with ``*args``) and their names; None when the
        signature cannot be read.
    """
    forward = getattr(type(model), "forward", None)
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    return required, None if varargs else len(positional), [p.name for p in positional]


def check_example_inputs(model: nn.Module, inputs: tuple[Any, ...] | None) -> None:
    """Check normalised example inputs against the model's ``forward`` before anything runs.

    Args:
        model: the caller's model.
        inputs: the example inputs as a tuple (None when fxprune is to synthesize them).

    Raises:
        ArgumentError: more or fewer inputs than ``forward`` takes, or an input on the meta device.
    """
    if inputs is None:
        return
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise ArgumentError(
                f"example input {i} is on the meta device: fxprune runs the model on the example inputs and "
                f"needs real tensors; pass e.g. torch.randn{tuple(x.shape)} on the model's device"
            )
    arity = forward_arity(model)
    if arity is None:
        return
    required, maximum, names = arity
    signature = f"{type(model).__name__}.forward({', '.join(names)})"
    if maximum is not None and len(inputs) > maximum:
        raise ArgumentError(
            f"{len(inputs)} example inputs given, but {signature} takes at most {maximum}; pass a tuple "
            "with one value per positional parameter of forward, in order"
        )
    if len(inputs) < required:
        raise ArgumentError(
            f"{len(inputs)} example inputs given, but {signature} needs {required}; pass a tuple with one "
            f"value per positional parameter of forward, in order ({', '.join(names[:required])})"
        )


def example_inputs_message(example_inputs: Any) -> str:
    """The message for example inputs that are neither a tensor nor a list or tuple.

    Args:
        example_inputs: what the caller passed.

    Returns:
        A message naming the type and what to pass instead (for a dict: the tuple to pass).
    """
    kind = type(example_inputs).__name__
    if isinstance(example_inputs, dict):
        keys = list(example_inputs)[:4]
        instead = ", ".join(f"example_inputs[{k!r}]" for k in keys) + ("," if len(keys) == 1 else "")
        return (f"example_inputs is a {kind} (keys {keys}); keyword inputs are not supported: pass a "
                f"tuple in forward's positional order, e.g. ({instead})")
    return f"example_inputs must be a tensor or a tuple of inputs in forward's positional order, got {kind}"


def check_forward_runs(work: nn.Module, original: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Run fxprune's private copy once on the example inputs: a forward that raises is the caller's error
    (a ``ShapeError`` naming the exception, not the exception itself from deep inside a pass).

    Args:
        work: fxprune's private copy of the model (in eval mode); its tensors are restored afterwards.
        original: the caller's model (only read, to restore ``work``).
        inputs: the example inputs.

    Raises:
        ShapeError: the forward raised; the message names the exception.
    """
    from fxprune.passes.eager_check import restore_state

    try:
        with torch.no_grad():
            work(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:300]
        raise ShapeError(
            f"the model does not run on example inputs of shape {shapes or '(none)'}: "
            f"{type(e).__name__}: {first}. Pass example_inputs that the model accepts."
        ) from e
    finally:
        restore_state(work, original)  # a forward may update buffers


def check_hidden(hidden: Any) -> float:
    """``hidden`` as a float in [0, 1), or ``ArgumentError``."""
    if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or not 0.0 <= float(hidden) < 1.0:
        raise ArgumentError(f"hidden must be a number with 0 <= hidden < 1 (the fraction of the hidden size, "
                            f"the residual stream, removed), or None to keep it; got {hidden!r}")
    return float(hidden)


def check_output_path(path: Any, what: str) -> None:
    """Check that a file can be written at ``path`` before any work is done.

    Missing parent directories are fine (they are created); the nearest existing one must be a writable
    directory.

    Args:
        path: the output path the caller passed (None: no output requested).
        what: the argument's name, for the message (``"onnx"``).

    Raises:
        ArgumentError: the path is not a str or PathLike, is an existing directory, has a file as a
            parent, or its directory is not writable.
    """
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ArgumentError(f"{what} must be a file path such as 'model.onnx', got {path!r}")
    target = Path(os.fspath(path)).expanduser().absolute()
    given = f"{what}={os.fspath(path)!r}"
    if target.is_dir():
        raise ArgumentError(f"{given} is an existing directory; pass a file path inside it, such as "
                            f"{str(target / 'model.onnx')!r}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArgumentError(f"{given}: {parent} is a file, not a directory; pass a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"{given}: the directory {parent} is not writable; pass a path in a directory "
                            "you can write to")


def plan_argument(plan: Any) -> PruningPlan:
    """The plan given to ``fxprune.apply``: a ``PruningPlan``, or the path of one saved with ``plan.save``.

    Args:
        plan: a ``PruningPlan``, a str or an ``os.PathLike``.

    Returns:
        The plan (loaded when a path was given).

    Raises:
        ArgumentError: ``plan`` is neither, or the file does not exist.
        PlanMismatchError: the file is not an fxprune plan.
    """
    if isinstance(plan, PruningPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return PruningPlan.load(plan)
    raise ArgumentError(f"plan must be a PruningPlan or the path of a plan saved with plan.save(path), got "
                        f"{type(plan).__name__}")


def check_scores(scores: Any, group: int, size: int, criterion: Any) -> np.ndarray:
    """Validate what an importance criterion returned for one group.

    Args:
        scores: the criterion's return value.
        group: the group's id (named in the message).
        size: the number of channels of the group.
        criterion: the criterion, for its name in the message.

    Returns:
        The scores as a float64 array of shape ``(size,)``.

    Raises:
        ArgumentError: the scores are not numbers, have the wrong shape, or contain NaN or infinity.
    """
    name = getattr(criterion, "__name__", type(criterion).__name__)
    try:
        raw = scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores
        s = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"importance {name} returned {type(scores).__name__} for group {group}; it must "
                            f"return {size} numbers (one score per channel)") from e
    if s.shape != (size,):
        raise ArgumentError(f"importance {name} returned shape {s.shape} for group {group} of {size} "
                            f"channels; it must return one score per channel, shape ({size},)")
    bad = ~np.isfinite(s)
    if bad.any():
        first = int(np.argmax(bad))
        what = "NaN" if math.isnan(s[first]) else "infinite"
        raise ArgumentError(f"importance {name} returned {int(bad.sum())} non-finite scores for group "
                            f"{group} (channel {first} is {what}); return finite scores, e.g. with "
                            "np.nan_to_num")
    return s
