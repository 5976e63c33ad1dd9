"""Sensitivity analysis: prune each coupled group alone at several ratios and measure a metric.

The curves then become per-group ratios that meet a MAC budget with the least predicted loss:

    sens = fxprune.sensitivity(model, x, eval_fn, ratios=(0.25, 0.5, 0.75))
    print(sens.table()); sens.plot("sensitivity.png")
    small = fxprune.compile(model, example_inputs=x, group_ratios=sens.allocate(target_macs=0.5))
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from tqdm.auto import tqdm

from fxprune.errors import FxPruneError
from fxprune.metrics import count_params
from fxprune.passes.budget import CostModel
from fxprune.passes.importance import Criterion, resolve, score_groups
from fxprune.passes.rewrite import RewritePass
from fxprune.passes.select import Policy, select_channels
from fxprune.plan import ChannelGroup
from fxprune.stages import prepare

log = logging.getLogger(__name__)


_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def line_style(i: int) -> tuple[str, str, str]:
    """The (colour, line style, marker) of the ``i``-th curve: distinct (colour, line style) pairs for the
    first 40 curves (ten colours per line style), and a marker cycle of another length on top."""
    return _COLORS[i % 10], _LINESTYLES[(i // 10) % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)]


@dataclass(frozen=True)
class SensitivityResult:
    """Metric of the model with one group pruned at each ratio.

    Attributes:
        baseline: the metric of the unpruned model.
        ratios: the probed ratios.
        groups: the probed (prunable) groups.
        metric: group id -> metric at each ratio.
        macs: group id -> fraction of the original MACs left at each ratio.
        higher_is_better: whether a larger metric is better (accuracy) or worse (loss).
    """

    baseline: float
    ratios: tuple[float, ...]
    groups: tuple[ChannelGroup, ...]
    metric: dict[int, tuple[float, ...]]
    macs: dict[int, tuple[float, ...]]
    higher_is_better: bool = True
    _cost: Callable[[dict[int, float]], float] = field(repr=False, compare=False, default=lambda r: 1.0)

    def loss(self, group_id: int, step: int) -> float:
        """Metric lost by pruning one group at ``ratios[step]`` (positive = worse)."""
        m = self.metric[group_id][step]
        return (self.baseline - m) if self.higher_is_better else (m - self.baseline)

    def table(self) -> str:
        """A Markdown table: one row per group, one column per ratio."""
        head = "| group | first producer | channels | " + " | ".join(f"r={r:g}" for r in self.ratios) + " |"
        rows = [head, "|---|---|---|" + "---|" * len(self.ratios)]
        for g in self.groups:
            vals = " | ".join(f"{v:.4g}" for v in self.metric[g.id])
            rows.append(f"| {g.id} | {g.producers[0] if g.producers else '-'} | {g.size} | {vals} |")
        return f"baseline metric: {self.baseline:.4g}\n\n" + "\n".join(rows)

    def figure(self, top: int = 12) -> Any:
        """A matplotlib ``Figure`` (Agg backend) of metric vs ratio for the ``top`` most sensitive groups.

        Each curve starts at the unpruned metric (ratio 0). Each group gets its own (colour, line style,
        marker): ten colours, then the next ten groups dashed, and so on, so more than ten groups stay apart;
        the legend sits beside the plot, most sensitive first.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        worst = sorted(self.groups, key=lambda g: -self.loss(g.id, len(self.ratios) - 1))[:top]
        fig, ax = plt.subplots(figsize=(9.5, 5.0), layout="constrained")
        for i, g in enumerate(worst):
            color, ls, marker = line_style(i)
            name = g.producers[0].removesuffix(".weight[0]") if g.producers else ""
            ax.plot((0.0, *self.ratios), (self.baseline, *self.metric[g.id]), color=color, ls=ls, marker=marker,
                    markevery=list(range(1, len(self.ratios) + 1)), lw=1.6, ms=5, label=f"{g.id}: {name[-36:]}")
        ax.axhline(self.baseline, color="black", lw=0.9, ls=(0, (1, 1)), label="unpruned")
        ax.set_xticks((0.0, *self.ratios))
        ax.set_xlabel("fraction of the group's channels removed", fontsize=10)
        ax.set_ylabel("metric" + (" (higher is better)" if self.higher_is_better else " (lower is better)"),
                      fontsize=10)
        ax.set_title(f"Sensitivity per coupled group: {len(worst)} most sensitive of {len(self.groups)}",
                     fontsize=11)
        ax.grid(color="#e4e4e4", lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(title="group: first producer", fontsize=8, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), frameon=False)
        return fig

    def plot(self, path: str, top: int = 12) -> None:
        """Save a PNG of metric vs ratio for the ``top`` most sensitive groups (see :meth:`figure`)."""
        import matplotlib.pyplot as plt

        fig = self.figure(top)
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def allocate(self, target_macs: float) -> dict[int, float]:
        """Per-group ratios that bring MACs to ``target_macs`` (fraction) greedily, cheapest loss per MAC first.

        Raises:
            FxPruneError: the probed ratios cannot reach the target.
        """
        steps = {g.id: -1 for g in self.groups}
        current: dict[int, float] = {}
        frac = self._cost(current)
        while frac > target_macs:
            best, best_key = None, None
            for g in self.groups:
                nxt = steps[g.id] + 1
                if nxt >= len(self.ratios):
                    continue
                trial = {**current, g.id: self.ratios[nxt]}
                saved = frac - self._cost(trial)
                if saved <= 0:
                    continue
                before = self.loss(g.id, steps[g.id]) if steps[g.id] >= 0 else 0.0
                key = (max(0.0, self.loss(g.id, nxt) - before) / saved, g.id)
                if best_key is None or key < best_key:
                    best, best_key = g.id, key
            if best is None:
                raise FxPruneError(f"the probed ratios cannot reach {target_macs:.0%} of the MACs (got {frac:.1%})")
            steps[best] += 1
            current[best] = self.ratios[steps[best]]
            frac = self._cost(current)
        return current


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    groups: Iterable[int] | None = None,
    importance: str | Criterion = "l2",
    higher_is_better: bool = True,
    ignore: Iterable[str | type] = (),
    leaves: Sequence[str] = (),
    progress: bool = True,
) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and evaluate ``eval_fn(pruned_model)``.

    Args:
        model: the model (never modified).
        example_inputs: inputs for tracing and shapes.
        eval_fn: returns the metric of a model (e.g. accuracy on a held-out batch).
        ratios: ratios to probe, each in (0, 1).
        groups: restrict to these group ids (default: every prunable group).
        importance: which channels a ratio removes.
        higher_is_better: True for accuracy-like metrics, False for losses.
        ignore: module names or types to keep.
        leaves: submodules to keep opaque.
        progress: show a progress bar.
    """
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios) or list(ratios) != sorted(ratios):
        raise ValueError(f"ratios must be increasing numbers in (0, 1), got {ratios}")
    a = prepare(model, example_inputs, ignore, leaves)
    scores = score_groups(a.gm, a.deps, a.groups, resolve(importance))
    cost = CostModel(a.gm, a.deps, count_params(model))
    wanted = set(groups) if groups is not None else None
    probe = tuple(g for g in a.groups if g.prunable and (wanted is None or g.id in wanted))
    training = model.training

    def plan_for(group_ratios: dict[int, float]):
        return select_channels(a.deps, a.groups, scores, Policy(0.0, group_ratios=group_ratios))

    def evaluate(m: nn.Module) -> float:
        m.eval()
        try:
            return float(eval_fn(m))
        finally:
            m.train(training)

    baseline = evaluate(copy.deepcopy(a.gm))
    metric: dict[int, tuple[float, ...]] = {}
    macs: dict[int, tuple[float, ...]] = {}
    bar = tqdm(total=len(probe) * len(ratios), desc="sensitivity", disable=not progress)
    for g in probe:
        vals, fracs = [], []
        for r in ratios:
            plan = plan_for({g.id: r})
            pruned = RewritePass(a.deps, plan)(copy.deepcopy(a.gm)).model
            vals.append(evaluate(pruned))
            fracs.append(cost.cost(plan).macs)
            bar.update(1)
        metric[g.id], macs[g.id] = tuple(vals), tuple(fracs)
    bar.close()
    return SensitivityResult(baseline, ratios, probe, metric, macs, higher_is_better,
                             _cost=lambda gr: cost.cost(plan_for(gr)).macs)
