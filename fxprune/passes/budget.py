"""Find the ratio that meets a MAC or parameter budget, by bisection over plans predicted from shapes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch.fx as fx

from fxprune.errors import ArgumentError, FxPruneError
from fxprune.passes.dependency import DependencyResult, canonical_names
from fxprune.passes.macs import estimate_macs
from fxprune.passes.rewrite import kept_indices, new_shapes
from fxprune.passes.select import Policy, select_channels
from fxprune.plan import ChannelGroup, PruningPlan

log = logging.getLogger(__name__)

BUDGET_TOLERANCE = 0.02  # a plan more than 2 points of the original under its target is reported


@dataclass(frozen=True)
class Cost:
    """Predicted cost of a plan, as fractions of the unpruned model."""

    macs: float
    params: float


class CostModel:
    """Predicts MACs and parameters of any plan of one analysed model."""

    def __init__(self, gm: fx.GraphModule, deps: DependencyResult, params_before: int) -> None:
        self.gm, self.deps = gm, deps
        self.canonical = canonical_names(gm)
        self.param_names = {name for name, _ in gm.named_parameters()}
        self.params_before = params_before
        self.macs_before = estimate_macs(gm, deps, deps.value_shapes, self.canonical)

    def removed_params(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """Parameters (not buffers) a plan removes, given its planned shapes."""
        removed = 0
        for value, qual in self.deps.params.items():
            if qual in self.param_names:
                removed += int(np.prod(self.deps.value_shapes[value])) - int(np.prod(shapes[value]))
        return removed

    def absolute(self, plan: PruningPlan, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[int, int]:
        """(MACs, params) of the pruned model a plan gives (``shapes``: its planned shapes, when known)."""
        if shapes is None:
            shapes = new_shapes(self.deps, kept_indices(self.deps, plan))
        return estimate_macs(self.gm, self.deps, shapes, self.canonical), self.params_before - self.removed_params(shapes)

    def cost(self, plan: PruningPlan) -> Cost:
        """Fractions of MACs and parameters left."""
        macs, params = self.absolute(plan)
        return Cost(macs / max(1, self.macs_before), params / max(1, self.params_before))


def plan_for_budget(
    cost_model: CostModel,
    groups: tuple[ChannelGroup, ...],
    scores: list[np.ndarray],
    policy: Policy,
    target_macs: float | None = None,
    target_params: float | None = None,
    iterations: int = 30,
) -> PruningPlan:
    """The plan with the smallest ratio whose MACs (or params) fraction is at or below the target.

    Raises:
        FxPruneError: the budget cannot be met even at the largest ratio (too much is pinned).
    """
    if (target_macs is None) == (target_params is None):
        raise ArgumentError("give exactly one of target_macs and target_params")
    target = float(target_macs if target_macs is not None else target_params)  # type: ignore[arg-type]
    if not 0.0 < target <= 1.0:
        raise ArgumentError(f"budget targets are fractions of the original in (0, 1], got {target!r}")

    def frac(r: float, overrides: dict[int, float] | None = None) -> tuple[float, PruningPlan]:
        per_group = {**(policy.group_ratios or {}), **(overrides or {})}
        plan = select_channels(cost_model.deps, groups, scores, replace(policy, ratio=r, group_ratios=per_group))
        c = cost_model.cost(plan)
        return (c.macs if target_macs is not None else c.params), plan

    lo, hi = 0.0, 0.99
    best_f, best = frac(hi)
    if best_f > target:
        what = "MACs" if target_macs is not None else "parameters"
        raise FxPruneError(
            f"cannot reach {target:.0%} of the original {what}: the most fxprune can remove leaves {best_f:.1%} "
            "(pinned groups stay whole); raise the target or unpin layers"
        )
    for _ in range(iterations):
        mid = (lo + hi) / 2
        f, plan = frac(mid)
        if f <= target:
            hi, best = mid, plan
        else:
            lo = mid
    # At the boundary several groups of one size flip together; give channels back group by group while
    # the budget still holds, so the result lands close under the target instead of a whole step below.
    _, over = frac(lo)
    overrides: dict[int, float] = {}
    for g, kept_hi, kept_lo in zip(groups, best.kept, over.kept, strict=True):
        if len(kept_lo) > len(kept_hi) and not (policy.group_ratios and g.id in policy.group_ratios):
            f, plan = frac(hi, {**overrides, g.id: lo})
            if f <= target:
                overrides[g.id] = lo
                best = plan
    c = cost_model.cost(best)
    reached = c.macs if target_macs is not None else c.params
    if target - reached > BUDGET_TOLERANCE:
        what = "MACs" if target_macs is not None else "parameters"
        steps = f"round_to={policy.round_to} moves kept counts in steps of {policy.round_to}" if policy.round_to \
            else "channel groups are removed in whole steps"
        log.warning("fxprune: the plan keeps %.1f%% of the original %s for a target of %.1f%%: the closest plan at "
                    "or under the budget (%s; a larger plan exceeds it)", 100 * reached, what, 100 * target, steps)
    return replace(best, ratio=hi)
