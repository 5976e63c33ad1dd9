"""``fxprune.apply``'s work: replay a saved ``PruningPlan`` on a fresh instance of the model it was made for.

    replay(model, plan, inputs)
      1. the hidden size, when the plan has one (``hidden.replay_hidden``, on a private copy)
      2. the root graph, unless the plan's root was not traced (no fingerprint): traced as the plan's was
         (same modules kept whole, same specialisation), checked group by group and by fingerprint,
         rewritten with the recorded kept channels and proven
      3. the parts pruned piecewise (inside opaque modules, or every part of an untraceable root): each part
         found by the same ``compile_parts`` walk, and given its own recorded plan by this function (a part
         with no plan of its own was not compiled whole: its children are tried, as they were)

Nothing is scored or selected again: every kept channel comes from the plan, so the result has exactly the
pruned shapes and ``load_state_dict`` accepts the pruned model's weights.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.nn as nn

from fxprune.copying import private_copy
from fxprune.errors import ArgumentError, PlanMismatchError, TraceError
from fxprune.metrics import count_params
from fxprune.part_outcomes import PartOutcome, Pruned, Untraced
from fxprune.partial import compile_parts, settle_parts
from fxprune.passes.budget import CostModel
from fxprune.passes.select import plan_from_kept
from fxprune.passes.train_mode import restore_flags
from fxprune.plan import PruningPlan
from fxprune.results import PruneResult
from fxprune.stages import Prepared, as_inputs, prepare, rewrite_and_prove


def replay(model: nn.Module, plan: PruningPlan, example_inputs: Any, ignore: tuple[str | type, ...],
           leaves: tuple[str, ...], verify: bool, output: str = "graph") -> nn.Module:
    """The pruned model ``plan`` describes, made from ``model`` (never modified).

    Raises:
        PlanMismatchError: the model, or one of its parts, is not the planned one.
        ArgumentError: the plan holds choices a replay cannot make again (``PruningPlan.pieces``).
    """
    if plan.pieces:
        more = f" and {len(plan.pieces) - 3} more" if len(plan.pieces) > 3 else ""
        raise ArgumentError(
            f"this plan cannot be replayed: {', '.join(plan.pieces[:3])}{more} were pruned by choices a plan does "
            "not hold (fused mixture-of-experts modules, expert by expert). Save the pruned model itself instead "
            "(save_pretrained for a Hugging Face model with output='module', or torch.save)"
        )
    if plan.hidden:  # 1. the hidden size first; the groups were planned on its result
        from fxprune.hidden import replay_hidden

        model, hidden_plan = replay_hidden(model, plan.hidden, as_inputs(example_inputs) or ())
        ignore = (*ignore, *hidden_plan.config_modules)  # as prune(hidden=...) kept them at their new width
    ignore = (*ignore, *plan.kept_whole)
    if plan.parts and not plan.fingerprint:  # the root was not traced: pruned part by part only
        return _replay_root_parts(model, plan, example_inputs, ignore)
    try:  # 2. the root graph
        a = prepare(model, example_inputs, ignore, leaves, prune_heads=plan.prune_heads, specialize=plan.specialize)
    except TraceError as e:
        raise PlanMismatchError(f"the planned model's graph was traced, this one's is not ({e})") from e
    done = rewrite_and_prove(a, _checked(a, plan, model), CostModel(a.gm, a.deps, count_params(model)),
                             verify=verify, onnx=None, onnx_opset=18, output=output).model
    if plan.parts:  # 3. the parts inside opaque modules, each replayed by its own plan
        opaque = [n for n in sorted(a.opaque) if not any(n.startswith(o + ".") for o in a.opaque)]
        replayer = _PartReplayer(done, plan, verify)
        for name in opaque:
            parent, _, child = name.rpartition(".")
            replayer.run(done.get_submodule(parent), parent, a.inputs, list(ignore), only=child)
        replayer.finish()
        _settle(done, model)
    return done


def _replay_root_parts(model: nn.Module, plan: PruningPlan, example_inputs: Any,
                       ignore: tuple[str | type, ...]) -> nn.Module:
    root = private_copy(model)
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise PlanMismatchError("the planned model was pruned piecewise: pass example_inputs to replay it")
    replayer = _PartReplayer(root, plan, verify=False)
    replayer.run(root, "", inputs, list(ignore))
    replayer.finish()
    _settle(root, model)
    return root


def _settle(result: nn.Module, original: nn.Module) -> None:
    """As after a piecewise prune: ties into the parts and their state from ``original``, and its flags."""
    settle_parts(result, original)
    restore_flags(result, {n: m.training for n, m in original.named_modules()})


class _PartReplayer:
    """``compile_parts``' per-part compile that replays each part's recorded plan, found by the part's name.

    A part without a plan of its own was not compiled whole when the plan was made, so its children are
    tried, as they were then. Any other failure stops the replay: a part left whole would be a model pruned
    less than the plan says.
    """

    def __init__(self, root: nn.Module, plan: PruningPlan, verify: bool) -> None:
        self.root = root
        self.plans = dict(plan.parts)
        self.verify = verify
        self.done: set[str] = set()

    def run(self, scope: nn.Module, scope_name: str, inputs: tuple[Any, ...], ignore: list[Any],
            only: str | None = None) -> None:
        """Replay every planned part under ``scope``."""
        compile_parts(self.root, scope, scope_name, inputs, self, ignore, only=only)

    def finish(self) -> None:
        """Every part the plan holds must have been replayed."""
        missing = [n for n in self.plans if n not in self.done]
        if missing:
            raise PlanMismatchError(f"the plan has parts this model does not call as planned: {missing[:3]}")

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], ignore: list[Any], _calibration: Any,
                 _importance: Any, name: str) -> PartOutcome:
        """A part's outcome: replayed by its own plan, or untraced (its children are tried) when it has none.
        A replay that fails raises: the walk stops (a part left whole would be pruned less than planned)."""
        own = self.plans.get(name)
        if own is None:
            return Untraced(f"{name}: no plan of its own")
        pruned = replay(module, own, inputs, tuple(ignore), (), self.verify, output="module")
        self.done.add(name)
        return Pruned(PruneResult(pruned, own, True, count_params(module), count_params(pruned), 0, 0, None, 0.0))


def _checked(a: Prepared, plan: PruningPlan, model: nn.Module) -> PruningPlan:
    """The plan's kept channels on ``a``'s groups, after checking that they are the planned groups."""
    if len(a.groups) != len(plan.groups) and plan.groups:
        raise PlanMismatchError(f"the plan has {len(plan.groups)} channel groups, this model {len(a.groups)}")
    kept = list(plan.kept) if plan.groups else [tuple(range(g.size)) for g in a.groups]  # hidden size only
    for mine, theirs in zip(a.groups, plan.groups, strict=False):
        if (mine.size, mine.producers) != (theirs.size, theirs.producers):
            raise PlanMismatchError(
                f"group {mine.id} differs: the plan has {theirs.size} channels from {list(theirs.producers)[:3]}, "
                f"this model {mine.size} from {list(mine.producers)[:3]}"
            )
    if plan.fingerprint and plan.fingerprint != a.fingerprint:
        raise PlanMismatchError(
            f"graph fingerprint {a.fingerprint} differs from the plan's {plan.fingerprint} (same groups, other ops "
            f"or shapes: check example_inputs and the model version, {type(model).__name__})"
        )
    for g, k in zip(a.groups, kept, strict=True):
        if any(i < 0 or i >= g.size for i in k) or len(set(k)) != len(k) or not k:
            raise PlanMismatchError(f"group {g.id}: kept positions {list(k)[:8]} do not fit its {g.size} channels")
    out = plan_from_kept(a.deps, a.groups, kept, plan.ratio)
    return replace(out, fingerprint=a.fingerprint, versions=plan.versions, prune_heads=plan.prune_heads,
                   inputs=plan.inputs)
