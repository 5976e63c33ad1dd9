"""The public entry points: ``compile`` (prune and return a smaller model), ``prune`` and ``analyze``."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import FxPruneError, InvariantError
from fxprune.metrics import count_params
from fxprune.passes.dependency import DependencyResult, build_dependencies
from fxprune.passes.importance import IMPORTANCE, Importance
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.select import describe_groups, select_channels
from fxprune.passes.shapes import shapes_for
from fxprune.passes.trace import trace
from fxprune.passes.verify import OracleReport, check_shapes, mask_oracle
from fxprune.plan import ChannelGroup, PruningPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """A dry run: the coupled groups of a model and why some cannot be pruned. Nothing is modified.

    Attributes:
        groups: every coupled channel group.
        opaque: submodules kept opaque by the tracer, with the reason.
        example_inputs: the inputs used for shape propagation (given or synthesized).
    """

    groups: tuple[ChannelGroup, ...]
    opaque: dict[str, str]
    example_inputs: tuple[Any, ...]

    def table(self) -> str:
        """A readable table: one line per group."""
        lines = [f"{'group':>5}  {'channels':>8}  {'pinned':>6}  status / first producer"]
        for g in self.groups:
            what = g.producers[0] if g.producers else "-"
            status = "prunable" if g.prunable else f"kept: {g.reason}"
            lines.append(f"{g.id:>5}  {g.size:>8}  {g.n_pinned:>6}  {status}  [{what}]")
        n_ok = sum(g.prunable for g in self.groups)
        lines.append(f"{n_ok} of {len(self.groups)} groups prunable")
        return "\n".join(lines)


@dataclass(frozen=True)
class PruneResult:
    """Everything ``prune`` produced.

    Attributes:
        model: the pruned, dense GraphModule (a new object; the input model is untouched).
        plan: the channels kept per group.
        modified: False when nothing was removed (ratio 0 or nothing prunable).
        params_before: parameter count of the input model.
        params_after: parameter count of the pruned model (equals the plan's prediction).
        oracle: the mask-equivalence report when ``verify=True``, else None.
        seconds: wall time of analysis and rewrite.
    """

    model: fx.GraphModule
    plan: PruningPlan
    modified: bool
    params_before: int
    params_after: int
    oracle: OracleReport | None
    seconds: float


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be a number with 0 <= ratio < 1 (the fraction of channels removed), got {ratio!r}")
    return float(ratio)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ValueError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _private_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        return copy.deepcopy(model).eval()
    except Exception as e:
        raise FxPruneError(f"cannot copy the model ({e}); fxprune never prunes the caller's model in place") from e


def _analyse(
    model: nn.Module, example_inputs: Any, ignore: Iterable[str | type], leaves: Sequence[str]
) -> tuple[fx.GraphModule, DependencyResult, dict[str, str], tuple[Any, ...]]:
    ignore = list(ignore)
    names = {name for name, _ in model.named_modules()}
    for item in ignore:
        if isinstance(item, str) and item not in names:
            close = sorted(n for n in names if n and (item in n or n in item))[:5]
            raise ValueError(f"ignore={item!r} names no submodule of the model" + (f"; did you mean {close}?" if close else ""))
        if not isinstance(item, (str, type)):
            raise ValueError(f"ignore entries must be module names or types, got {item!r}")
    work = _private_copy(model)
    gm, opaque = trace(work, leaves)  # 1. capture; untraceable submodules become opaque leaves
    shapes, inputs = shapes_for(gm, _as_tuple(example_inputs))  # 2. shapes, needed by every rule
    deps = build_dependencies(gm, shapes, ignore, opaque)  # 3. channel rules -> coupled classes
    return gm, deps, opaque, inputs


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    ignore: Iterable[str | type] = (),
    leaves: Sequence[str] = (),
) -> Analysis:
    """Dry run: trace, propagate shapes and list the coupled channel groups. Nothing is modified.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor or tuple of tensors the model accepts (optional when inferable).
        ignore: module names (prefixes) or types whose channels must stay.
        leaves: submodules to keep opaque.
    """
    _, deps, opaque, inputs = _analyse(model, example_inputs, ignore, leaves)
    return Analysis(groups=describe_groups(deps), opaque=opaque, example_inputs=inputs)


def prune(
    model: nn.Module,
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    ignore: Iterable[str | type] = (),
    importance: str | Importance = "l2",
    leaves: Sequence[str] = (),
    verify: bool = False,
    onnx: str | None = None,
    onnx_opset: int = 18,
) -> PruneResult:
    """Prune ``ratio`` of the channels of every coupled group and return the result with its plan.

    See ``compile`` for the arguments; ``prune`` also returns the plan, counts and the oracle report.
    """
    ratio = _check_ratio(ratio)
    score_fn = IMPORTANCE.get(importance) if isinstance(importance, str) else importance
    if score_fn is None:
        raise ValueError(f"unknown importance {importance!r}; choose one of {sorted(IMPORTANCE)} or pass a callable")
    t0 = time.perf_counter()
    was_training = model.training
    params_before = count_params(model)
    gm, deps, _, inputs = _analyse(model, example_inputs, ignore, leaves)
    groups = describe_groups(deps)
    plan = select_channels(deps, groups, score_fn(gm, deps), ratio)  # 4. choose channels per group
    reference = copy.deepcopy(gm) if verify else None
    param_names = {name for name, _ in gm.named_parameters()}
    rewrite = RewritePass(deps, plan)
    result = rewrite(gm)  # 5. slice parameters, fix attributes, rewrite literal sizes
    pruned = result.model
    check_shapes(pruned, inputs, rewrite.shapes)  # invariant: every value has its planned shape
    params_after = count_params(pruned)
    predicted = params_before - _removed_params(deps, rewrite, param_names)
    if params_after != predicted:
        raise InvariantError(f"pruned model has {params_after} parameters, the plan predicted {predicted}")
    seconds = time.perf_counter() - t0
    oracle = None
    if verify:
        assert reference is not None
        oracle = mask_oracle(reference, pruned, deps, plan, inputs)
        if oracle.applicable and not oracle.passed:
            raise InvariantError(f"mask oracle failed: max |pruned - masked original| = {oracle.max_abs_diff:.3g}")
    pruned.train(was_training)
    if onnx is not None:
        from fxprune.passes.export import export_onnx

        export_onnx(pruned, inputs, onnx, opset=onnx_opset)
        pruned.train(was_training)
    log.info("fxprune: %d -> %d parameters in %.2fs", params_before, params_after, seconds)
    return PruneResult(pruned, plan, result.modified, params_before, params_after, oracle, seconds)


def _removed_params(deps: DependencyResult, rewrite: RewritePass, param_names: set[str]) -> int:
    """Parameters the plan removes (buffers such as running statistics do not count)."""
    removed = 0
    for value, qual in deps.params.items():
        if qual in param_names:
            removed += torch.Size(deps.value_shapes[value]).numel() - torch.Size(rewrite.shapes[value]).numel()
    return removed


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    ignore: Iterable[str | type] = (),
    importance: str | Importance = "l2",
    leaves: Sequence[str] = (),
    verify: bool = False,
    onnx: str | None = None,
    onnx_opset: int = 18,
) -> fx.GraphModule:
    """Return a physically smaller, dense copy of ``model`` with ``ratio`` of each coupled group's channels removed.

    Args:
        model: the model to prune; it is never modified.
        ratio: fraction of channels removed in every prunable coupled group, 0 <= ratio < 1.
        example_inputs: a tensor or tuple of tensors the model accepts; optional when fxprune can infer
            the input shape from the first layer (a clear ``ShapeError`` says when it cannot).
        ignore: module names (prefixes) or types whose channels must stay.
        importance: "l2" (default), "l1", "random", or a callable ``(gm, deps) -> scores per class``.
        leaves: submodules to keep opaque (their channels stay).
        verify: run the mask-equivalence oracle and raise if it fails.
        onnx: write a simplified, onnxruntime-checked ONNX file of the pruned model to this path.
        onnx_opset: ONNX opset for ``onnx``.

    Returns:
        A ``torch.fx.GraphModule`` with the same call signature, output structure and parameter names.
    """
    return prune(
        model, ratio, example_inputs=example_inputs, ignore=ignore, importance=importance, leaves=leaves,
        verify=verify, onnx=onnx, onnx_opset=onnx_opset,
    ).model
