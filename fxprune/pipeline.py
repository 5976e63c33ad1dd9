"""``run``: the whole of ``fxprune.prune``, one non-recursive function read top to bottom.

    run(model, options)
      0. check the model and every option (output paths included) before any work; with ``hidden``, the
         hidden size first (``hidden.hidden_stage``), steps 1-2 on its result, then ``hidden.finish_hidden``
      _widths(model, options): steps 1-2
      1. compile once at the requested policy (``_compile``)
           a. prepare: private copy, trace, eager check, train-mode check, channel dependencies
              (``stages.prepare``); a root that cannot be traced goes to the piecewise strategy (1e)
           b. importance of every channel, per group
           c. which channels stay: by ratio, or searched to a MAC/parameter budget on the graph
           d. rewrite and prove (``stages.rewrite_and_prove``): shapes, parameter count, oracle, write-back, ONNX;
              modules a write-back refuses are kept whole and c-d run again on a fork of the same trace
           e. parts: the insides of opaque modules, or every part of an untraceable root, pruned one by one
              with ``compile_parts`` and this module's per-part compile (``_part_compiler``)
      2. a budget over a model with parts cannot be searched inside each part (0.3 of 0.3 compounds): the
         compile of step 1 declines, and one uniform ratio is bisected over the whole model instead
         (``_search_uniform_ratio``), each probe a step-1 compile

Every strategy is a named function below, called from ``run``, ``_widths`` or ``_compile`` only; no module
calls ``run`` but the public entry points (``api.py``). Piecewise pruning compiles each part with the function
``compile_parts`` is given (``_part_compiler``: ``_widths`` on the part), which answers with a typed outcome.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from fxprune.copying import private_copy
from fxprune.errors import FxPruneError, InvariantError, TraceError
from fxprune.hf_config import sync_config
from fxprune.metrics import count_macs, count_params
from fxprune.options import Options
from fxprune.partial import (
    CompilePart,
    PartOutcome,
    PartReport,
    Pruned,
    compile_parts,
    outcome_of,
    settle_parts,
)
from fxprune.passes.budget import CostModel, plan_for_budget
from fxprune.passes.eager_check import restore_state
from fxprune.passes.importance import resolve, score_groups
from fxprune.passes.reconstruct import reconstruct
from fxprune.passes.select import Policy, select_channels
from fxprune.passes.train_mode import restore_flags
from fxprune.passes.writeback import WriteBackError, repeats_of
from fxprune.plan import PruningPlan, input_specs, versions
from fxprune.results import PruneResult
from fxprune.stages import Prepared, as_inputs, fork, gc_paused, prepare, reanalysed, rewrite_and_prove
from fxprune.validate import check_forward_runs

log = logging.getLogger(__name__)

MAX_WRITE_BACK_RETRIES = 8  # rewrites a write-back may ask for, each keeping more modules whole


def run(model: nn.Module, options: Options) -> PruneResult:
    """Prune ``model`` by ``options`` (``fxprune.prune`` documents them). The caller's model is never run,
    written or modified; the result owns every tensor."""
    options = options.checked()  # 0. every option, the output path included, before any work (the model is
    # checked first thing in ``stages.prepare``, which every entry point goes through)
    if options.hidden is None:
        return _widths(model, options)
    from fxprune.hidden import (  # the hidden size first (fxprune/hidden.py)
        HiddenStage,
        finish_hidden,
        hidden_stage,
    )
    from fxprune.hidden_config import quiet

    with torch.inference_mode(False):
        stage = hidden_stage(model, options)
        if not isinstance(stage, HiddenStage):  # nothing else asked for
            return stage
        with quiet("fxprune.hf_config"):
            rest = _widths(stage.work, stage.rest)  # then heads and MLPs on its result
        return finish_hidden(stage, rest)


def _widths(model: nn.Module, options: Options) -> PruneResult:
    """``run`` without the hidden size: heads, MLPs and every other width (``options`` checked)."""
    t0 = time.perf_counter()
    with torch.inference_mode(False):  # the pruned parameters stay trainable under a caller's inference_mode
        result = _compile(model, options)  # 1. the requested policy
        if isinstance(result, BudgetOverParts):  # 2. one uniform ratio, searched over the whole model
            log.info("fxprune: %s: one uniform ratio is searched over the whole model", result.reason)
            result = _search_uniform_ratio(model, options)
    result = replace(result, seconds=time.perf_counter() - t0)
    log.info("fxprune: %d -> %d parameters in %.2fs", result.params_before, result.params_after, result.seconds)
    return result


@dataclass(frozen=True)
class BudgetOverParts:
    """Step 1's answer when a MAC or parameter budget meets a model with parts: a search inside each part would
    compound (0.3 of 0.3), so step 2 searches one uniform ratio over the whole model instead."""

    reason: str


def _compile(model: nn.Module, options: Options) -> PruneResult | BudgetOverParts:
    """Step 1: one compile at ``options``' policy (a ``BudgetOverParts`` when step 2 must search the budget).

    The cyclic garbage collector is paused for the whole compile, not only inside each stage: re-enabled
    between stages, the first allocation after one could start a full collection of everything the
    process holds (0.2 s after torch and torchvision's imports), as much as a small model's compile. Parts
    compiled inside collect after each part (``partial.compile_parts``), so their copies do not pile up.
    """
    with gc_paused():
        return _compile_paused(model, options)


def _compile_paused(model: nn.Module, options: Options) -> PruneResult | BudgetOverParts:
    try:  # a. prepare (must precede everything: the graph, its groups and the inputs come from it)
        a = prepare(model, options.example_inputs, options.ignore, options.leaves, prune_heads=options.prune_heads,
                    specialize=options.output == "module", pinned=options.pinned)
    except TraceError as e:
        if not options.partial:
            raise
        # The failed attempt's private copy lives on in the traceback's frames (and cycles): freed before
        # the piecewise strategy makes its own (a whole model's worth of memory)
        _forget_frames(e)
        gc.collect()
        if options.budget:
            return BudgetOverParts("the root cannot be traced: its parts are pruned one by one")
        return _compile_root_parts(model, options, e)  # e. piecewise, the root
    # Opaque modules are compiled piecewise; one inside another is covered by its outermost ancestor.
    opaque = [n for n in sorted(a.opaque) if not any(n.startswith(o + ".") for o in a.opaque)]
    # A module the user named in ``leaves`` is kept whole, insides included; the other opaque ones are not.
    opaque = [n for n in opaque if options.partial and not any(n == x or n.startswith(x + ".") for x in options.leaves)]
    if opaque and options.budget:
        return BudgetOverParts(f"{len(opaque)} opaque module(s) are pruned as parts")  # the graph's search
        # would see each opaque part as fixed
    params_before = count_params(model)
    kept_whole: tuple[str, ...] = ()  # by the write-back, recorded in the plan: a replay keeps them whole too
    for attempt in range(MAX_WRITE_BACK_RETRIES + 1):
        eager = a.work if a.gm.meta.get("fxprune_example_values", True) else None  # a graph specialised to the example
        scores = score_groups(a.gm, a.deps, a.groups, resolve(options.importance, options.calibration), eager)  # b.
        cost = CostModel(a.gm, a.deps, params_before)
        plan = _select(a, options, scores, cost)  # c. which channels stay
        fits = reconstruct(a.gm, a.deps, plan, options.calibration_batches() or (), eager, a.inputs,
                           options.reconstruct_targets) \
            if options.reconstruct else ()  # c'. the kept weights refitted on the calibration batches, before the rewrite proves them
        # d. rewrite and prove; the ONNX waits for the parts when there are some. With output="module" a
        # write-back may name modules whose own forward cannot take the plan (an attribute, another tensor):
        # they are kept whole, and c-d run again on an untouched fork of the same trace (``stages.fork``)
        fresh = fork(a) if options.output == "module" else None
        try:
            done = rewrite_and_prove(a, plan, cost, verify=options.verify, onnx=None if opaque else options.onnx,
                                     onnx_opset=options.onnx_opset, output=options.output)
            break
        except WriteBackError as e:
            # The same module in every repeat of its block (each decoder layer's o_proj) fails the same way
            new = tuple(n for n in repeats_of(model, [c for c in e.culprits if c]) if n not in options.ignore)
            if fresh is None or not new:
                raise
            if attempt == MAX_WRITE_BACK_RETRIES:
                raise FxPruneError(f"the write-back still fails after keeping {len(kept_whole)} modules whole "
                                   f"({MAX_WRITE_BACK_RETRIES} retries); use output='graph'") from e
            log.info("fxprune: keeping %s whole so your own forward stays valid (%s)", ", ".join(new), e)
        kept_whole += new
        options = replace(options, ignore=(*options.ignore, *new))
        restore_state(fresh.work, model)  # what the failed attempt's runs wrote into the shared tensors
        a = reanalysed(fresh, list(options.ignore))
        gc.collect()  # the failed attempt's graphs (cycles) and slices, before the next rewrite
    plan = replace(plan, kept_whole=kept_whole)
    parts: list[PartReport] = []
    compile_part, part_plans, part_fits = _part_compiler(options)
    for name in opaque:  # e. opaque leaves have pinned inputs and outputs: their insides are separate
        parent, _, child = name.rpartition(".")  # the opaque module itself is tried whole first
        parts += compile_parts(done.model, done.model.get_submodule(parent), parent, a.inputs, compile_part,
                               [*options.ignore, *options.leaves],  # a leaf the user named stays whole
                               only=child, calibration=options.calibration_batches(), importance=options.importance,
                               expert_policy=_policy(options.part_options()), sequential=options.reconstruct)
    if not parts:
        return PruneResult(done.model, plan, done.modified, params_before, done.params_after, cost.macs_before,
                           done.macs_after, done.oracle, 0.0, reconstruction=fits)
    settle_parts(done.model, model, _refitted(fits, part_fits))
    if options.output == "module":  # the parts changed widths after the graph's config sync
        sync_config(done.model, a.inputs)
    restore_flags(done.model, {n: m.training for n, m in model.named_modules()})
    changed = any(p.params_after < p.params_before for p in parts)
    # The graph's cost model sees an opaque part as one call: count both sides the same way when parts changed.
    params_after = count_params(done.model) if changed else done.params_after
    macs_before = count_macs(model, a.inputs) if changed else cost.macs_before
    macs_after = count_macs(done.model, a.inputs) if changed else done.macs_after
    if opaque and options.onnx is not None:
        _export(done.model, a.inputs, options.onnx, options.onnx_opset)
    plan = replace(plan, pieces=_pieces(parts, part_plans), parts=tuple(part_plans.items()))
    return PruneResult(done.model, plan, done.modified or changed, params_before, params_after, macs_before,
                       macs_after, done.oracle, 0.0, tuple(parts),
                       reconstruction=(*fits, *(f for r in part_fits.values() for f in r)))


def _forget_frames(e: BaseException) -> None:
    """Drop the tracebacks of ``e`` and of the errors it was raised from, clearing their frames' locals (a
    failed trace's frames hold the model copy it traced)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        ex = stack.pop()
        if ex is None or id(ex) in seen:
            continue
        seen.add(id(ex))
        tb = ex.__traceback__
        while tb is not None:
            with contextlib.suppress(RuntimeError):  # a frame still running (this one's callers) stays
                tb.tb_frame.clear()
            tb = tb.tb_next
        ex.__traceback__ = None
        stack += [ex.__cause__, ex.__context__]


def _policy(options: Options) -> Policy:
    """The selection policy the options ask for."""
    return Policy(options.ratio, options.ratios, options.group_ratios, options.global_ranking,
                  round_to=options.round_to, min_channels=options.min_channels)


def _select(a: Prepared, options: Options, scores: list[Any], cost: CostModel) -> PruningPlan:
    """Step 1c: the kept channels, by ratio or searched to the budget, stamped with what a replay needs."""
    policy = _policy(options)
    if options.budget:
        plan = plan_for_budget(cost, a.groups, scores, policy, options.target_macs, options.target_params)
    else:
        plan = select_channels(a.deps, a.groups, scores, policy)
    return replace(plan, fingerprint=a.fingerprint, versions=versions(), prune_heads=options.prune_heads,
                   inputs=input_specs(a.inputs), specialize=options.output == "module")


def _search_uniform_ratio(model: nn.Module, options: Options) -> PruneResult:
    """Step 2: bisect one uniform ratio until the whole model (parts included) is at or below the budget."""
    target = options.target_macs if options.target_macs is not None else options.target_params
    by_ratio = replace(options, target_macs=None, target_params=None)
    probe = replace(by_ratio, verify=False, onnx=None)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):  # the ratio to within 0.004: the fraction to within about 1%
        mid = (lo + hi) / 2
        r = _by_ratio(model, replace(probe, ratio=mid))
        frac = r.macs_after / r.macs_before if options.target_macs is not None else r.params_after / r.params_before
        if frac <= target:  # type: ignore[operator]
            best, hi = mid, mid
        else:
            lo = mid
    if best is None:
        raise FxPruneError(f"the budget {target} cannot be met even at ratio 0.95 (too much is pinned)")
    log.info("fxprune: ratio %.3f meets the budget over the whole model, parts included", best)
    return _by_ratio(model, replace(by_ratio, ratio=best))


def _by_ratio(model: nn.Module, options: Options) -> PruneResult:
    """Step 1 without a budget (it always compiles)."""
    result = _compile(model, options)
    if not isinstance(result, PruneResult):
        raise InvariantError(f"a compile by ratio declined: {result.reason}")
    return result


def _compile_root_parts(model: nn.Module, options: Options, error: TraceError) -> PruneResult:
    """Step 1e for a root that cannot be traced: prune its largest traceable submodules one by one."""
    inputs = as_inputs(options.example_inputs)
    if inputs is None:
        raise TraceError(f"{error} Piecewise pruning of its submodules needs example_inputs.") from error
    root = private_copy(model)
    check_forward_runs(root, model, inputs)  # a forward that raises: ShapeError, naming it
    params_before = count_params(model)
    macs_before = count_macs(root, inputs)  # count_macs runs a copy of the copy: nothing of the caller's
    compile_part, part_plans, part_fits = _part_compiler(options)
    parts = compile_parts(root, root, "", inputs, compile_part, [*options.ignore, *options.leaves],
                          calibration=options.calibration_batches(), importance=options.importance,
                          expert_policy=_policy(options.part_options()), sequential=options.reconstruct)
    settle_parts(root, model, _refitted((), part_fits))
    sync_config(root, inputs)  # a Hugging Face config follows the pruned widths where it can (in eval mode)
    modified = any(p.params_after < p.params_before for p in parts)
    if not modified and (options.ratio > 0 or all(p.skipped for p in parts)):  # at ratio 0 parts stay whole
        why = "; ".join(f"{p.name}: {p.skipped}" for p in parts if p.skipped)[:400]
        raise TraceError(f"{error} No traceable submodule could be pruned either ({why or 'none found'}).") from error
    restore_flags(root, {n: m.training for n, m in model.named_modules()})  # after the eval-mode runs above
    if options.onnx is not None:
        _export(root, inputs, options.onnx, options.onnx_opset)
    empty = PruningPlan(options.ratio, (), (), (), versions=versions(), pieces=_pieces(parts, part_plans),
                        parts=tuple(part_plans.items()), specialize=options.output == "module")  # no fingerprint:
    # the root was not traced (``replay`` goes straight to the parts)
    return PruneResult(root, empty, modified, params_before, count_params(root), macs_before,
                       count_macs(root, inputs), None, 0.0, tuple(parts),
                       reconstruction=tuple(f for r in part_fits.values() for f in r))


def _pieces(parts: list[PartReport], plans: dict[str, PruningPlan]) -> tuple[str, ...]:
    """Parts that changed with no plan of their own (fused experts), here or inside a part: a replay cannot
    make their choices."""
    own = [p.name for p in parts if p.params_after < p.params_before and p.name not in plans]
    return (*own, *(f"{name}: {piece}" for name, plan in plans.items() for piece in plan.pieces))


def _part_compiler(options: Options) -> tuple[CompilePart, dict[str, PruningPlan], dict[str, tuple[Any, ...]]]:
    """How ``compile_parts`` prunes one part: this pipeline's step 1 on the part, as the user's own classes;
    the plan of every part it compiles and its reconstruction, by the part's name (filled as it goes)."""
    part = options.part_options()
    data = options.calibration_batches() is not None
    activation = data and getattr(resolve(options.importance, options.calibration), "needs_activations", False)
    plans: dict[str, PruningPlan] = {}
    fits: dict[str, tuple[Any, ...]] = {}

    def compile_part(module: nn.Module, inputs: tuple[Any, ...], ignore: list[Any],
                     calibration: list[tuple[Any, ...]] | None, importance: Any, name: str,
                     targets: list[tuple[Any, ...]] | None = None) -> PartOutcome:
        own = replace(part, example_inputs=inputs, ignore=tuple(ignore))
        if data:  # measured (and refitted) on what arrives at this part, not at the root; the refit's targets
            # on what the unpruned model gave it (``targets``, batch for batch)
            own = replace(own, calibration=calibration or [inputs], reconstruct_targets=targets if calibration else None)
        if activation:
            own = replace(own, importance="activation")
        if importance is not None:  # gradients of the whole model's loss (Taylor): the part cannot run it
            own = replace(own, importance=importance)
        outcome = outcome_of(lambda: _widths(module, own.checked()))
        if name and isinstance(outcome, Pruned):
            plans[name] = outcome.result.plan
            fits[name] = outcome.result.reconstruction
        return outcome

    return compile_part, plans, fits


def _refitted(fits: tuple[Any, ...], part_fits: dict[str, tuple[Any, ...]]) -> frozenset[str]:
    """The qualified names of the tensors the refits wrote: the root graph's layers (``fits``) and each part's
    (``part_fits``, by part; a part's layers are named inside its binding, ``inner.``)."""
    layers = {f.name for f in fits} | {f"{part}.{f.name.removeprefix('inner.')}" if part else f.name.removeprefix("inner.")
                                       for part, found in part_fits.items() for f in found}
    return frozenset(f"{layer}.{t}" for layer in layers for t in ("weight", "bias"))


def _export(model: nn.Module, inputs: tuple[Any, ...], path: str, opset: int) -> None:
    from fxprune.passes.export import export_onnx

    flags = {n: m.training for n, m in model.named_modules()}
    export_onnx(model, inputs, path, opset=opset)
    restore_flags(model, flags)
