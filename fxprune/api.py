"""The public entry points: ``compile``, ``prune``, ``apply`` and ``analyze``."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ArgumentError, FxPruneError, PlanMismatchError, TraceError
from fxprune.hf_config import sync_config
from fxprune.metrics import count_macs, count_params
from fxprune.partial import PartReport, compile_parts
from fxprune.passes.budget import CostModel, plan_for_budget
from fxprune.passes.eager_check import restore_state
from fxprune.passes.importance import Criterion, resolve, score_groups
from fxprune.passes.select import Policy, plan_from_kept, select_channels
from fxprune.passes.ties import retie
from fxprune.passes.train_mode import restore_flags
from fxprune.passes.verify import OracleReport
from fxprune.passes.writeback import WriteBackError
from fxprune.pipeline import analyse, as_inputs, finish, private_copy
from fxprune.plan import ChannelGroup, PruningPlan
from fxprune.validate import check_forward_runs, check_model, check_output_path, plan_argument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """A dry run: the coupled groups of a model and why some cannot be pruned. Nothing is modified.

    Attributes:
        groups: every coupled channel group.
        opaque: submodules kept opaque by the tracer, with the reason.
        example_inputs: the inputs used for shape propagation (given or synthesized).
        fingerprint: hash of the traced graph (what a saved plan is checked against).
    """

    groups: tuple[ChannelGroup, ...]
    opaque: dict[str, str]
    example_inputs: tuple[Any, ...]
    fingerprint: str
    dependencies: Any = field(default=None, repr=False, compare=False)

    @property
    def graph(self) -> Any:
        """The channel-dependency graph as a ``networkx.MultiGraph``, for drawing and inspection.

        Nodes are channel spaces ``(value, dim)``: one dim of one tensor or parameter (``"param:conv.weight"``),
        with ``size``, ``pinned`` (the reason, "" when free) and ``group`` (the id of the coupled group its
        channels belong to, -1 when none). Each edge is one coupling a rule stated, with ``why`` (the node)
        and ``a_index``/``b_index``: index ``a_index[k]`` of one end is channel ``b_index[k]`` of the other
        (None: the identity). ``examples/draw_dependency_graph.py`` draws it.
        """
        g = self.dependencies.dep.graph
        sol = self.dependencies.solution
        for space in g.nodes:
            ids = sol.groups_in(space) if space in sol.offsets else []
            g.nodes[space]["group"] = ids[0] if ids else -1
        return g

    def table(self) -> str:
        """A readable table: one line per group."""
        lines = [f"{'group':>5}  {'channels':>8}  {'pinned':>6}  status  [first producer]"]
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
        model: the pruned, dense model (a new object; the input model is untouched): a GraphModule, or
            with ``output="module"`` a copy of the user's own module tree proven equal to it.
        plan: the channels kept per group (save it with ``plan.save(path)``).
        modified: False when nothing was removed (ratio 0 or nothing prunable).
        params_before: parameter count of the input model.
        params_after: parameter count of the pruned model (equals the plan's prediction).
        macs_before: MACs of the input model at the example inputs (conv, linear, matmul, attention).
        macs_after: MACs of the pruned model.
        oracle: the mask-equivalence report when ``verify=True``, else None.
        seconds: wall time of analysis and rewrite.
        parts: submodules pruned piecewise (inside opaque modules, or all of them when the root forward
            cannot be traced), each with its own counts and oracle verdict.
    """

    model: nn.Module
    plan: PruningPlan
    modified: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    oracle: OracleReport | None
    seconds: float
    parts: tuple[PartReport, ...] = ()


def _check_ratio(ratio: float, what: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ArgumentError(f"{what} must be a number with 0 <= {what} < 1 (the fraction of channels removed), got {ratio!r}")
    return float(ratio)


def _input_specs(inputs: tuple[Any, ...]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Shape and dtype of every tensor input (what a replay needs to rebuild the same graph)."""
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return ()
    return tuple((tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs)


def _versions() -> dict[str, str]:
    from fxprune import __version__

    return {"fxprune": __version__, "torch": torch.__version__}


def prune(*args: Any, **kwargs: Any) -> PruneResult:
    """Prune and return the model together with its plan, counts and proof. See ``compile`` for arguments.

    Runs outside any ``torch.inference_mode`` of the caller, so the pruned parameters stay trainable.
    """
    with torch.inference_mode(False):
        return _prune(*args, **kwargs)


def _prune(
    model: nn.Module,
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    ignore: Iterable[str | type] = (),
    importance: str | Criterion = "l2",
    global_ranking: bool = False,
    target_macs: float | None = None,
    target_params: float | None = None,
    ratios: Mapping[str, float] | None = None,
    group_ratios: Mapping[int, float] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    prune_heads: bool = False,
    leaves: Sequence[str] = (),
    verify: bool = False,
    onnx: str | None = None,
    onnx_opset: int = 18,
    output: str = "graph",
    partial: bool = True,
) -> PruneResult:
    arguments = dict(locals())  # every argument, for the retry below
    check_output_path(onnx, "onnx")  # before any work
    check_model(model)
    ratio = _check_ratio(ratio)
    for key, r in {**(ratios or {}), **{str(k): v for k, v in (group_ratios or {}).items()}}.items():
        _check_ratio(r, f"ratio for {key!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ArgumentError(f"round_to must be a positive integer, got {round_to!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ArgumentError(f"min_channels must be a positive integer, got {min_channels!r}")
    if output not in ("graph", "module"):
        raise ArgumentError(f"output must be 'graph' (a GraphModule) or 'module' (your own classes), got {output!r}")
    criterion = resolve(importance)
    t0 = time.perf_counter()
    params_before = count_params(model)
    part_kwargs = dict(ratio=ratio, importance=importance, global_ranking=global_ranking, target_macs=target_macs,
                       target_params=target_params, round_to=round_to, min_channels=min_channels, verify=verify,
                       prune_heads=prune_heads)
    budget = target_macs is not None or target_params is not None
    try:
        a = analyse(model, example_inputs, ignore, leaves, prune_heads=prune_heads, specialize=output == "module")
    except TraceError as e:
        if not partial:
            raise
        if budget:
            return _budget_with_parts(arguments, target_macs, target_params)
        return _prune_parts(model, example_inputs, part_kwargs, e, onnx, onnx_opset, t0, list(ignore))
    # Opaque modules are compiled piecewise; one inside another is covered by its outermost ancestor.
    opaque_parts = [n for n in sorted(a.opaque) if not any(n.startswith(o + ".") for o in a.opaque)]
    opaque_parts = opaque_parts if partial and not leaves else []
    if opaque_parts and budget:
        # The graph's search sees an opaque part as fixed, and a search inside each part would compound (0.3
        # of 0.3): search one uniform ratio over the whole model instead, parts included.
        return _budget_with_parts(arguments, target_macs, target_params)
    scores = score_groups(a.gm, a.deps, a.groups, criterion)  # importance of every channel, per group
    policy = Policy(ratio, ratios, group_ratios, global_ranking, round_to=round_to, min_channels=min_channels)
    cost = CostModel(a.gm, a.deps, params_before)
    if budget:
        plan = plan_for_budget(cost, a.groups, scores, policy, target_macs, target_params)
    else:
        plan = select_channels(a.deps, a.groups, scores, policy)
    plan = replace(plan, fingerprint=a.fingerprint, versions=_versions(), prune_heads=prune_heads,
                   inputs=_input_specs(a.inputs))
    try:
        done = finish(a, plan, cost, verify=verify, onnx=None if opaque_parts else onnx,
                      onnx_opset=onnx_opset, output=output)
    except WriteBackError as e:
        # Your forward takes a size from somewhere fxprune cannot rewrite (an attribute, another tensor):
        # keep that module's channels and try again, so output="module" still gives your classes.
        ignore = list(ignore)
        new = [c for c in e.culprits if c and c not in ignore]
        if not new or len(ignore) > 64:
            raise
        log.info("fxprune: keeping %s whole so your own forward stays valid (%s)", ", ".join(new), e)
        return _prune(**{**arguments, "ignore": [*ignore, *new]})
    parts: list[PartReport] = []
    for name in opaque_parts:  # opaque leaves have pinned inputs and outputs: their insides are separate
        parent, _, child = name.rpartition(".")  # the opaque module itself is tried whole first
        parts += compile_parts(done.model, done.model.get_submodule(parent), parent, a.inputs, part_kwargs,
                               list(ignore), only=child)
    if parts:  # each part was copied privately: ties into it, state and flags come from the caller's model
        retie(done.model, model)
        restore_state(done.model, model)
        restore_flags(done.model, {n: m.training for n, m in model.named_modules()})
    changed_parts = any(p.params_after < p.params_before for p in parts)
    params_after = count_params(done.model) if changed_parts else done.params_after
    macs_after = count_macs(done.model, a.inputs) if changed_parts else done.macs_after
    # The graph's cost model sees an opaque part as one call: count both sides the same way when parts changed.
    macs_before = count_macs(model, a.inputs) if changed_parts else cost.macs_before
    if opaque_parts and onnx is not None:
        _export(done.model, a.inputs, onnx, onnx_opset)
    seconds = time.perf_counter() - t0
    log.info("fxprune: %d -> %d parameters in %.2fs", params_before, params_after, seconds)
    return PruneResult(done.model, plan, done.modified or changed_parts, params_before, params_after,
                       macs_before, macs_after, done.oracle, seconds, tuple(parts))


def _budget_with_parts(arguments: dict[str, Any], target_macs: float | None, target_params: float | None) -> PruneResult:
    """Bisect one uniform ratio until the whole model (opaque parts included) is at or below the budget."""
    t0 = time.perf_counter()
    target = target_macs if target_macs is not None else target_params
    probe = {**arguments, "target_macs": None, "target_params": None, "verify": False, "onnx": None}
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):  # ratio to within 0.004: the fraction to within about 1%
        mid = (lo + hi) / 2
        r = _prune(**{**probe, "ratio": mid})
        frac = r.macs_after / r.macs_before if target_macs is not None else r.params_after / r.params_before
        if frac <= target:  # type: ignore[operator]
            best, hi = mid, mid
        else:
            lo = mid
    if best is None:
        raise FxPruneError(f"the budget {target} cannot be met even at ratio 0.95 (too much is pinned)")
    log.info("fxprune: ratio %.3f meets the budget over the whole model, opaque parts included", best)
    result = _prune(**{**arguments, "ratio": best, "target_macs": None, "target_params": None})
    return replace(result, seconds=time.perf_counter() - t0)  # the search's time too


def _export(model: nn.Module, inputs: tuple[Any, ...], path: str, opset: int) -> None:
    from fxprune.passes.export import export_onnx

    flags = {n: m.training for n, m in model.named_modules()}
    export_onnx(model, inputs, path, opset=opset)
    restore_flags(model, flags)


def _prune_parts(
    model: nn.Module, example_inputs: Any, part_kwargs: dict[str, Any], error: TraceError,
    onnx: str | None, onnx_opset: int, t0: float, ignore: list[str | type],
) -> PruneResult:
    """The root cannot be traced: prune its largest traceable submodules one by one (``partial.py``)."""
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TraceError(f"{error} Piecewise pruning of its submodules needs example_inputs.") from error
    root = private_copy(model)
    check_forward_runs(root, model, inputs)  # a forward that raises: ShapeError, naming it
    params_before = count_params(model)
    macs_before = count_macs(root, inputs)  # a copy of the copy runs: nothing of the caller's
    parts = compile_parts(root, root, "", inputs, part_kwargs, ignore)
    retie(root, model)
    restore_state(root, model)  # the recording run may have updated buffers
    sync_config(root, inputs)  # a Hugging Face config follows the pruned widths where it can
    if not any(p.params_after < p.params_before for p in parts):
        why = "; ".join(f"{p.name}: {p.skipped}" for p in parts if p.skipped)[:400]
        raise TraceError(f"{error} No traceable submodule could be pruned either ({why or 'none found'}).") from error
    restore_flags(root, {n: m.training for n, m in model.named_modules()})
    if onnx is not None:
        _export(root, inputs, onnx, onnx_opset)
    empty = PruningPlan(part_kwargs["ratio"], (), (), (), versions=_versions())
    params_after = count_params(root)
    macs_after = count_macs(root, inputs)
    return PruneResult(root, empty, True, params_before, params_after, macs_before, macs_after, None,
                       time.perf_counter() - t0, tuple(parts))


# ``prune`` is a thin wrapper (it leaves the caller's inference_mode); it has ``_prune``'s signature.
prune.__signature__ = inspect.signature(_prune)  # type: ignore[attr-defined]


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Return a physically smaller, dense copy of ``model`` with ``ratio`` of each coupled group's channels removed.

    Args:
        model: the model to prune; it is never modified.
        ratio: fraction of channels removed in every prunable coupled group, 0 <= ratio < 1.
        example_inputs: a tensor or tuple of tensors the model accepts; optional when fxprune can infer
            the input shape from the first layer (a clear ``ShapeError`` says when it cannot).
        **kwargs: the policy and output options:
            ``ignore`` (module names or types whose channels stay), ``importance`` ("l2", "l1", "random",
            "bn_scale", "lamp", a ``Taylor(batches)`` or any ``(GroupTensors) -> scores`` callable),
            ``global_ranking``, ``target_macs`` / ``target_params`` (fraction of the original to keep;
            the ratio is searched), ``ratios`` (per-module overrides), ``group_ratios`` (per-group),
            ``round_to`` (kept counts multiple of N), ``min_channels``, ``prune_heads`` (remove whole
            attention heads instead of thinning every head; head counts and literals follow), ``leaves`` (submodules kept
            opaque), ``verify`` (run the mask oracle), ``onnx`` (path of a verified, simplified ONNX
            file), ``onnx_opset``, ``output`` ("graph": a GraphModule, the default; "module": a copy of
            your own module tree with the pruned weights, picklable as your classes, proven equal).

    Returns:
        A ``torch.fx.GraphModule`` (or your own classes with ``output="module"``) with the same call
        signature, output structure and parameter names.
    """
    return prune(model, ratio, example_inputs=example_inputs, **kwargs).model


def apply(
    model: nn.Module,
    plan: PruningPlan | str,
    example_inputs: Any = None,
    *,
    ignore: Iterable[str | type] = (),
    leaves: Sequence[str] = (),
    verify: bool = False,
) -> fx.GraphModule:
    """Replay a saved plan on a fresh instance of the model it was made for.

    The result has exactly the pruned shapes, so ``load_state_dict`` accepts the pruned weights. Without
    ``example_inputs``, inputs of the shapes and dtypes recorded in the plan are used.

    Raises:
        PlanMismatchError: the model differs from the planned one; names the first differing group.
    """
    plan = plan_argument(plan)  # a PruningPlan, or loaded from a path (str or PathLike)
    if example_inputs is None:
        example_inputs = plan.example_inputs()  # the shapes and dtypes the plan was made with
    a = analyse(model, example_inputs, ignore, leaves, prune_heads=plan.prune_heads)
    if len(a.groups) != len(plan.groups):
        raise PlanMismatchError(f"the plan has {len(plan.groups)} channel groups, this model {len(a.groups)}")
    for mine, theirs in zip(a.groups, plan.groups, strict=True):
        if (mine.size, mine.producers) != (theirs.size, theirs.producers):
            raise PlanMismatchError(
                f"group {mine.id} differs: the plan has {theirs.size} channels from {list(theirs.producers)[:3]}, "
                f"this model {mine.size} from {list(mine.producers)[:3]}"
            )
    if plan.fingerprint and plan.fingerprint != a.fingerprint:
        raise PlanMismatchError(
            f"graph fingerprint {a.fingerprint} differs from the plan's {plan.fingerprint} (same groups, other ops "
            "or shapes: check example_inputs and the model version)"
        )
    for g, kept in zip(a.groups, plan.kept, strict=True):
        if any(k < 0 or k >= g.size for k in kept) or len(set(kept)) != len(kept) or not kept:
            raise PlanMismatchError(f"group {g.id}: kept positions {list(kept)[:8]} do not fit its {g.size} channels")
    replay = plan_from_kept(a.deps, a.groups, list(plan.kept), plan.ratio)
    replay = replace(replay, fingerprint=a.fingerprint, versions=plan.versions, prune_heads=plan.prune_heads,
                     inputs=plan.inputs)
    cost = CostModel(a.gm, a.deps, count_params(model))
    return finish(a, replay, cost, verify=verify, onnx=None, onnx_opset=18).model


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    ignore: Iterable[str | type] = (),
    leaves: Sequence[str] = (),
    prune_heads: bool = False,
) -> Analysis:
    """Dry run: trace, propagate shapes and list the coupled channel groups. Nothing is modified.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor or tuple of tensors the model accepts (optional when inferable).
        ignore: module names (prefixes) or types whose channels must stay.
        leaves: submodules to keep opaque.
        prune_heads: group attention channels by whole heads (as ``compile(..., prune_heads=True)``).
    """
    a = analyse(model, example_inputs, ignore, leaves, prune_heads=prune_heads)
    return Analysis(groups=a.groups, opaque=a.opaque, example_inputs=a.inputs, fingerprint=a.fingerprint,
                    dependencies=a.deps)
