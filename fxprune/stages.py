"""The two stages every entry point runs (``pipeline.run``, ``apply``, ``analyze``, ``sensitivity``).

    prepare:            private copy -> trace -> shapes -> eager check -> train-mode check -> dependency
                        graph -> groups
    rewrite_and_prove:  rewrite (its postcondition: every planned shape) -> parameter accounting -> oracle
                        (optional) -> write-back (optional) -> ONNX (optional) -> training flags
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.copying import private_copy
from fxprune.errors import ArgumentError, InvariantError
from fxprune.fast import generated
from fxprune.hf_config import sync_config
from fxprune.metrics import count_params
from fxprune.outputs import restore_output_class
from fxprune.passes.budget import CostModel
from fxprune.passes.dependency import DependencyResult, build_dependencies
from fxprune.passes.eager_check import check_graph_matches_eager, restore_state
from fxprune.passes.fingerprint import graph_fingerprint
from fxprune.passes.lower import LowerMultiheadAttention
from fxprune.passes.lower_windows import LowerWindowAttention
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.select import describe_groups
from fxprune.passes.shapes import shapes_for
from fxprune.passes.trace import trace
from fxprune.passes.train_mode import guard_train_mode, restore_flags, train_mode_difference
from fxprune.passes.verify import OracleReport, mask_oracle
from fxprune.passes.writeback import write_back
from fxprune.plan import ChannelGroup, PruningPlan
from fxprune.state import kept_buffers
from fxprune.validate import check_example_inputs, check_model, example_inputs_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
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
    output_type: type | None = None  # the class of the eager model's output (a Hugging Face ModelOutput, ...)


def as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """Normalise example inputs to a tuple (None stays None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ArgumentError(example_inputs_message(example_inputs))


def fork(a: Prepared) -> Prepared:
    """``a`` with its own copy of the private model's and the graph's structure (modules, attributes, graph,
    config), sharing every tensor: a rewrite of ``a`` replaces tensors and edits structure, so the fork stays
    as traced. Costs no tensor memory of its own, but keeps ``a``'s tensors alive while it is held."""
    memo: dict[int, Any] = {}
    for t in [*a.work.parameters(), *a.work.buffers(), *a.gm.parameters(), *a.gm.buffers()]:
        memo[id(t)] = t
    work, gm = copy.deepcopy((a.work, a.gm), memo)
    return replace(a, work=work, gm=gm)


def reanalysed(a: Prepared, ignore: list[str | type]) -> Prepared:
    """``a`` with its channel dependencies solved again for another ``ignore`` (the trace, its checks and its
    shapes do not depend on it)."""
    deps = build_dependencies(a.gm, a.deps.value_shapes, _by_name(a.work, ignore), a.opaque, a.deps.prune_heads,
                              a.deps.pinned)
    return replace(a, deps=deps, groups=describe_groups(deps), fingerprint=graph_fingerprint(a.gm, deps))


def _by_name(work: nn.Module, ignore: list[str | type]) -> list[str | type]:
    """``ignore`` with every module of an ignored type also named: the GraphModule keeps only the modules it
    calls, so a traced-through block (``GPT2Attention``) is found by type only in the model's own tree."""
    types = tuple(item for item in ignore if isinstance(item, type))
    if not types:
        return ignore
    return [*ignore, *(name for name, m in work.named_modules() if name and isinstance(m, types))]


def _check_ignore(model: nn.Module, ignore: list[str | type]) -> None:
    names = {name for name, _ in model.named_modules()}
    for item in ignore:
        if not isinstance(item, (str, type)):
            raise ArgumentError(f"ignore entries must be module names or types, got {item!r}")
        if isinstance(item, str) and item not in names:
            close = sorted(n for n in names if n and (item in n or n in item))[:5]
            hint = f"; did you mean {close}?" if close else ""
            raise ArgumentError(f"ignore={item!r} names no submodule of the model{hint}")


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


def prepare(
    model: nn.Module, example_inputs: Any, ignore: Iterable[str | type], leaves: Sequence[str], *,
    prune_heads: bool = False, specialize: bool = False, pinned: tuple[tuple[str, int, str], ...] = (),
) -> Prepared:
    """Trace a private copy, check the graph against eager PyTorch and solve its channel dependencies
    (``pinned``: parameter dims kept whole, see ``build_dependencies``)."""
    with gc_paused():
        return _prepare(model, example_inputs, list(ignore), leaves, prune_heads, specialize, pinned)


def _prepare(
    model: nn.Module, example_inputs: Any, ignore: list[str | type], leaves: Sequence[str],
    prune_heads: bool, specialize: bool, pinned: tuple[tuple[str, int, str], ...] = (),
) -> Prepared:
    check_model(model)  # an eager nn.Module with real buffers
    _check_ignore(model, ignore)
    flags = {name: m.training for name, m in model.named_modules()}
    work = private_copy(model)  # everything below runs on the copy only
    given = as_inputs(example_inputs)
    check_example_inputs(model, given)  # count and device, against forward's signature
    # 1. capture; untraceable parts -> opaque leaves. ``specialize``: branches on shapes may follow the inputs
    # (only for output="module", where the user's own forward is re-run and proven equal).
    gm, opaque = trace(work, leaves, len(given) if given else 1, given, specialize)
    lowered = LowerMultiheadAttention(set(opaque))(gm).modified  # its ops, not the module: heads become prunable
    lowered |= LowerWindowAttention()(gm).modified  # torchvision Swin's attention function, likewise
    # Traced without concrete shapes and nothing lowered: no branch or literal followed the example's size.
    shape_generic = not gm.meta.get("fxprune_example_values", True) and not lowered
    try:
        shapes, inputs = shapes_for(gm, given)  # 2. shapes, needed by every rule
    finally:  # tracing with example values or a real shape run may have updated buffers: undone first
        if gm.meta.get("fxprune_example_values", True) or gm.meta.get("fxprune_real_shape_run", True):
            restore_state(work, model)
    # 3. the graph must be the model: compared with eager PyTorch on a fresh input before it is trusted
    # (needs the inputs of step 2; restores every tensor of the copy that its runs changed)
    output_type = check_graph_matches_eager(gm, work, model, inputs, shape_generic)
    # the same opaque leaves as the eval graph: what their own forwards do in train mode is theirs to do.
    # Skipped when no traced code read a module's mode and nothing was lowered (a lowering is decided by the
    # mode): the train-mode trace would be this graph (fast.training_reads; always run with the switch off)
    train_differs = ""
    if gm.meta.get("fxprune_reads_training", True) or lowered:
        train_differs = train_mode_difference(work, gm, list(opaque), inputs, specialize)
    deps = build_dependencies(gm, shapes, _by_name(work, ignore), opaque, prune_heads, pinned)  # 4. channel rules -> coupled classes
    groups = describe_groups(deps)
    return Prepared(gm, deps, groups, opaque, inputs, graph_fingerprint(gm, deps), work, flags, train_differs,
                    output_type)


@dataclass(frozen=True)
class Proven:
    """The verified output of ``rewrite_and_prove``."""

    model: nn.Module
    modified: bool
    params_after: int
    macs_after: int
    oracle: OracleReport | None


def rewrite_and_prove(
    a: Prepared,
    plan: PruningPlan,
    cost: CostModel,
    *,
    verify: bool,
    onnx: str | None,
    onnx_opset: int,
    output: str = "graph",
) -> Proven:
    """Rewrite the private copy by ``plan`` and prove the result.

    Raises:
        InvariantError: a value's shape, the parameter count or the oracle disagrees with the plan.
    """
    reference = copy.deepcopy(a.gm) if verify else None
    rewrite = RewritePass(a.deps, plan, a.inputs)  # its postcondition: every value has its planned shape
    macs_after, predicted = cost.absolute(plan, rewrite.shapes)
    with gc_paused():
        result = rewrite(a.gm)  # slice parameters, fix module attributes, rewrite literal sizes
        pruned = result.model
        if output == "graph":
            restore_output_class(pruned, a.output_type)  # a ModelOutput, not the plain dict fx traced
        pruned = generated(pruned)  # its Python code, generated once, now that the graph is final
    params_after = count_params(pruned)
    if params_after != predicted:
        raise InvariantError(f"pruned model has {params_after} parameters, the plan predicted {predicted}")
    oracle = None
    model: nn.Module = pruned
    with kept_buffers(pruned, a.work):  # the proofs' runs leave no state behind (a counter, an average)
        if reference is not None:
            oracle = mask_oracle(reference, pruned, a.deps, plan, a.inputs)
            if oracle.applicable and not oracle.passed:
                raise InvariantError(f"mask oracle failed: max |pruned - masked original| = {oracle.max_abs_diff:.3g}")
        if output == "module":
            model = write_back(a.work, pruned, a.inputs, a.deps.prune_heads)  # the user's classes, proven equal
            sync_config(model, a.inputs)  # a Hugging Face config follows the pruned widths where it can
        if onnx is not None:
            from fxprune.passes.export import export_onnx

            export_onnx(model, a.inputs, onnx, opset=onnx_opset)
    restore_flags(model, a.flags)  # each module's own training flag, as in the caller's model
    if output == "graph" and a.train_differs:
        guard_train_mode(model, a.train_differs)
    return Proven(model, result.modified, params_after, macs_after, oracle)
