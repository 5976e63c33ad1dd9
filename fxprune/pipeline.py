"""The pipeline stages shared by ``prune``, ``apply``, ``analyze`` and ``sensitivity``, in order.

    analyse:  private copy -> trace -> shapes -> dependency graph -> groups
    finish:   rewrite -> shape invariant -> parameter accounting -> oracle (optional) -> ONNX (optional)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ArgumentError, FxPruneError, InvariantError
from fxprune.hf_config import sync_config
from fxprune.metrics import count_params
from fxprune.passes.base import generated
from fxprune.passes.budget import CostModel
from fxprune.passes.dependency import DependencyResult, build_dependencies
from fxprune.passes.eager_check import check_graph_matches_eager, restore_state
from fxprune.passes.fingerprint import graph_fingerprint
from fxprune.passes.lower import lower_multihead_attention
from fxprune.passes.lower_windows import lower_window_attention
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.select import describe_groups
from fxprune.passes.shapes import shapes_for
from fxprune.passes.trace import trace
from fxprune.passes.train_mode import guard_train_mode, restore_flags, train_mode_difference
from fxprune.passes.verify import OracleReport, check_shapes, mask_oracle
from fxprune.passes.writeback import write_back
from fxprune.plan import ChannelGroup, PruningPlan
from fxprune.validate import check_example_inputs, check_model, example_inputs_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysed:
    """A private, traced copy of a model with its dependency analysis (internal)."""

    gm: fx.GraphModule
    deps: DependencyResult
    groups: tuple[ChannelGroup, ...]
    opaque: dict[str, str]
    inputs: tuple[Any, ...]
    fingerprint: str
    work: nn.Module
    flags: dict[str, bool]  # every module's own training flag in the caller's model, by qualified name
    train_differs: str = ""  # why the model's train-mode graph differs from the eval graph ("" when it does not)


def as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """Normalise example inputs to a tuple (None stays None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ArgumentError(example_inputs_message(example_inputs))


def _check_ignore(model: nn.Module, ignore: list[str | type]) -> None:
    names = {name for name, _ in model.named_modules()}
    for item in ignore:
        if not isinstance(item, (str, type)):
            raise ArgumentError(f"ignore entries must be module names or types, got {item!r}")
        if isinstance(item, str) and item not in names:
            close = sorted(n for n in names if n and (item in n or n in item))[:5]
            hint = f"; did you mean {close}?" if close else ""
            raise ArgumentError(f"ignore={item!r} names no submodule of the model{hint}")


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, parameters and buffers included: fxprune never runs or writes the caller's
    tensors (a forward may update buffers, and ``Embedding(max_norm=...)`` or ``.data.clamp_()`` even write
    parameters)."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.utils import prune as nn_prune

    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise FxPruneError(
            f"parameter {meta[0]} is on the meta device: fxprune needs real weights to score channels; "
            "load or initialise the weights first (to replay a saved plan on a fresh model, use fxprune.apply)"
        )

    for name, mod in model.named_modules():
        if any(isinstance(h, nn_prune.BasePruningMethod) for h in mod._forward_pre_hooks.values()):
            raise FxPruneError(
                f"module {name or type(model).__name__} carries torch.nn.utils.prune masks; structured pruning "
                "needs real weights: call fxprune.sparsity.make_permanent(model) first"
            )
    try:
        return _copy_module(model, {}).eval()
    except Exception as e:
        from torch.nn.utils.weight_norm import WeightNorm

        legacy = [n or type(model).__name__ for n, m in model.named_modules()
                  if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())]
        hint = (f"; {legacy[0]} uses the legacy torch.nn.utils.weight_norm, which cannot be deep-copied: use "
                "torch.nn.utils.parametrizations.weight_norm, or torch.nn.utils.remove_weight_norm first") if legacy else ""
        first = str(e).split(".")[0]
        raise FxPruneError(f"cannot copy the model ({first}){hint}; fxprune never prunes the caller's model in place") from e


_IMMUTABLE = (int, float, bool, str, type(None), torch.dtype, torch.device)
# The hook and state tables every nn.Module creates for itself in __init__.
_HOOK_TABLES = frozenset(k for k in nn.Module().__dict__ if k not in ("_parameters", "_buffers", "_modules", "training"))


def _plain(mod: nn.Module) -> bool:
    cls = type(mod)
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and (cls.__setstate__ is nn.Module.__setstate__ or _fills_defaults(cls.__setstate__))
    )


def _fills_defaults(setstate: Any) -> bool:
    """torch.nn's own ``__setstate__`` overrides (conv, softmax, ...) only fill attributes that modules pickled
    by old torch versions lack; a live module has them all, so copying its ``__dict__`` is equivalent."""
    return getattr(setstate, "__module__", "").startswith("torch.nn.modules.")


def _copy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(mod, memo)``, with a fast path for plain modules (about 5x faster on a ResNet-50).

    A module whose class customises copying or pickling goes through ``copy.deepcopy``; in a plain module,
    empty hook dictionaries are recreated, immutable attributes kept, and everything else deep-copied with
    the shared memo, so references between modules and to (possibly shared) parameters stay consistent.
    """
    if id(mod) in memo:
        return memo[id(mod)]
    if not _plain(mod):
        return copy.deepcopy(mod, memo)
    new = object.__new__(type(mod))
    memo[id(mod)] = new
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key == "_modules":
            state[key] = {k: None if m is None else _copy_module(m, memo) for k, m in value.items()}
        elif isinstance(value, _IMMUTABLE) or (type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value)):
            state[key] = value
        elif key in ("_parameters", "_buffers") and type(value) is dict:
            state[key] = {k: _copy_tensor(t, memo) for k, t in value.items()}
        elif key in _HOOK_TABLES and type(value) in (dict, OrderedDict, set) and not value:
            state[key] = type(value)()  # nn.Module's own per-instance tables: never shared
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def _copy_tensor(t: torch.Tensor | None, memo: dict[int, Any]) -> torch.Tensor | None:
    """``copy.deepcopy(t, memo)`` for a module's own parameter or buffer, without the generic machinery."""
    if t is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    if type(t) is torch.Tensor and t.is_leaf and not t.requires_grad and not t.__dict__:
        new = t.clone(memory_format=torch.preserve_format)
        memo[id(t)] = new
        return new
    return copy.deepcopy(t, memo)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a compile pass allocates its graphs (restored on exit).

    A pass creates tens of thousands of small, mostly acyclic objects; they trip the collector, and a
    full collection scans every object the process holds (torch and timm imports: 0.2-0.3 s, as much as a
    whole small-model compile). Reference counting still frees the acyclic garbage at once; the cycles
    (fx nodes and graphs) are collected at the first collection after the pass.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def analyse(
    model: nn.Module, example_inputs: Any, ignore: Iterable[str | type], leaves: Sequence[str], *,
    prune_heads: bool = False, specialize: bool = False,
) -> Analysed:
    """Trace a private copy, check the graph against eager PyTorch and solve its channel dependencies."""
    with gc_paused():
        return _analyse(model, example_inputs, list(ignore), leaves, prune_heads, specialize)


def _analyse(
    model: nn.Module, example_inputs: Any, ignore: list[str | type], leaves: Sequence[str],
    prune_heads: bool, specialize: bool,
) -> Analysed:
    check_model(model)  # an eager nn.Module with real buffers
    _check_ignore(model, ignore)
    flags = {name: m.training for name, m in model.named_modules()}
    work = private_copy(model)  # everything below runs on the copy only
    given = as_inputs(example_inputs)
    check_example_inputs(model, given)  # count and device, against forward's signature
    # 1. capture; untraceable parts -> opaque leaves. ``specialize``: branches on shapes may follow the inputs
    # (only for output="module", where the user's own forward is re-run and proven equal).
    gm, opaque = trace(work, leaves, len(given) if given else 1, given, specialize)
    lower_multihead_attention(gm, set(opaque))  # its ops, not the module: heads become prunable
    lower_window_attention(gm)  # torchvision Swin's attention function, likewise
    try:
        shapes, inputs = shapes_for(gm, given)  # 2. shapes, needed by every rule
        # 3. the graph must be the model: compared with eager PyTorch on a fresh input before it is trusted
        # (needs the inputs of step 2; restores every tensor of the copy that a run changed)
        check_graph_matches_eager(gm, work, model, inputs)
    finally:
        restore_state(work, model)  # tracing with example values and the shape run may have updated buffers
    train_differs = train_mode_difference(work, gm, leaves, inputs, specialize)
    deps = build_dependencies(gm, shapes, ignore, opaque, prune_heads)  # 4. channel rules -> coupled classes
    groups = describe_groups(deps)
    return Analysed(gm, deps, groups, opaque, inputs, graph_fingerprint(gm, deps), work, flags, train_differs)


@dataclass(frozen=True)
class Finished:
    """The verified output of ``finish``."""

    model: nn.Module
    modified: bool
    params_after: int
    macs_after: int
    oracle: OracleReport | None


def finish(
    a: Analysed,
    plan: PruningPlan,
    cost: CostModel,
    *,
    verify: bool,
    onnx: str | None,
    onnx_opset: int,
    output: str = "graph",
) -> Finished:
    """Rewrite the private copy by ``plan`` and prove the result.

    Raises:
        InvariantError: a value's shape, the parameter count or the oracle disagrees with the plan.
    """
    reference = copy.deepcopy(a.gm) if verify else None
    rewrite = RewritePass(a.deps, plan)
    macs_after, predicted = cost.absolute(plan, rewrite.shapes)
    with gc_paused():
        result = rewrite(a.gm)  # slice parameters, fix module attributes, rewrite literal sizes
        pruned = result.model
        check_shapes(pruned, a.inputs, rewrite.shapes)  # invariant: every value has its planned shape
        pruned = generated(pruned)  # its Python code, generated once, now that the graph is final
    params_after = count_params(pruned)
    if params_after != predicted:
        raise InvariantError(f"pruned model has {params_after} parameters, the plan predicted {predicted}")
    oracle = None
    if reference is not None:
        oracle = mask_oracle(reference, pruned, a.deps, plan, a.inputs)
        if oracle.applicable and not oracle.passed:
            raise InvariantError(f"mask oracle failed: max |pruned - masked original| = {oracle.max_abs_diff:.3g}")
    model: nn.Module = pruned
    if output == "module":
        model = write_back(a.work, pruned, a.inputs, a.deps.prune_heads)  # the user's classes, proven equal to the graph
        sync_config(model, a.inputs)  # a Hugging Face config follows the pruned widths where it can
    if onnx is not None:
        from fxprune.passes.export import export_onnx

        export_onnx(model, a.inputs, onnx, opset=onnx_opset)
    restore_flags(model, a.flags)  # each module's own training flag, as in the caller's model
    if output == "graph" and a.train_differs:
        guard_train_mode(model, a.train_differs)
    return Finished(model, result.modified, params_after, macs_after, oracle)
