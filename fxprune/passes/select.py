"""Describe the coupled groups and choose which channels of each group to keep, following a ``Policy``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fxprune.depgraph import space_label, unique
from fxprune.passes.dependency import DependencyResult
from fxprune.plan import ChannelGroup, PruningPlan


@dataclass(frozen=True)
class Policy:
    """How many channels each group loses.

    Attributes:
        ratio: fraction of channels removed per prunable group (or overall, with ``global_ranking``).
        module_ratios: per-module overrides: a group takes the ratio of the longest module-name prefix
            matching one of its producers (``{"layer4": 0.7}``).
        group_ratios: per-group overrides by group id (what ``sensitivity`` produces); win over the rest.
        global_ranking: rank normalised scores across all groups with one threshold instead of a
            uniform per-group ratio.
        max_group_ratio: with global ranking, the largest fraction any one group may lose.
        round_to: kept channel counts become multiples of this (groups too small stay whole).
        min_channels: no group keeps fewer channels than this.
    """

    ratio: float = 0.5
    module_ratios: Mapping[str, float] | None = None
    group_ratios: Mapping[int, float] | None = None
    global_ranking: bool = False
    max_group_ratio: float = 0.9
    round_to: int | None = None
    min_channels: int = 1

    def ratio_of(self, group: ChannelGroup) -> float:
        """The ratio that applies to ``group``."""
        if self.group_ratios and group.id in self.group_ratios:
            return float(self.group_ratios[group.id])
        if self.module_ratios:
            best, best_len = None, -1
            for producer in group.producers:
                module = producer.rsplit(".", 1)[0]
                for key, r in self.module_ratios.items():
                    if (module == key or module.startswith(key + ".")) and len(key) > best_len:
                        best, best_len = r, len(key)
            if best is not None:
                return float(best)
        return self.ratio


def describe_groups(deps: DependencyResult) -> tuple[ChannelGroup, ...]:
    """Turn the solved classes into readable ``ChannelGroup`` records (members, pins, reasons)."""
    sol = deps.solution
    members: list[list[str]] = [[] for _ in sol.groups]
    for value in deps.params:
        for d in range(len(deps.value_shapes[value])):
            space = (value, d)
            if space not in sol.offsets:
                continue
            for g in sol.groups_in(space):
                members[g].append(space_label(space))
    out = []
    for g, classes in enumerate(sol.groups):
        pinned = classes[sol.pinned[classes]].tolist()
        reasons = list(dict.fromkeys(sol.class_pin[c] for c in pinned))
        out.append(
            ChannelGroup(
                id=g,
                size=len(classes),
                producers=tuple(space_label(s) for s in sol.group_producers[g]),
                members=tuple(members[g]),
                n_pinned=len(pinned),
                pin_reasons=tuple(reasons),
            )
        )
    return tuple(out)


def channels_per_class(deps: DependencyResult, group_id: int) -> int:
    """How many channels of the group's first producer one class stands for (grouped convs: > 1)."""
    sol = deps.solution
    space = sol.group_producers[group_id][0]
    labels = sol.space_labels(space)
    return max(1, len(labels) // max(1, len(unique(labels))))


def _round(keep: int, size: int, floor_keep: int, q: int) -> int:
    if q <= 1:
        return keep
    if size < q:
        return size
    rounded = max(q, int(round(keep / q)) * q)
    while rounded < floor_keep:
        rounded += q
    return min(rounded, size) if rounded <= size else size


def keep_counts(
    deps: DependencyResult, groups: tuple[ChannelGroup, ...], scores: list[np.ndarray], policy: Policy
) -> list[int]:
    """Number of channels each group keeps under ``policy``."""
    sol = deps.solution
    pinned = [np.array([bool(sol.class_pin[c]) for c in classes], dtype=bool) for classes in sol.groups]
    floors = [max(policy.min_channels, int(p.sum()), 1) for p in pinned]
    keep = [g.size for g in groups]
    if policy.global_ranking:
        entries = []
        for g in groups:
            if not g.prunable:
                continue
            s = scores[g.id]
            mean = float(np.mean(s[~pinned[g.id]])) if (~pinned[g.id]).any() else 0.0
            norm = s / mean if mean > 0 else s
            entries.extend((float(norm[p]), g.id, p) for p in np.nonzero(~pinned[g.id])[0])
        total = sum(g.size for g in groups if g.prunable)
        budget = math.floor(policy.ratio * total + 1e-9)
        caps = {g.id: min(g.size - floors[g.id], math.floor(policy.max_group_ratio * g.size)) for g in groups}
        for _, gid, _ in sorted(entries):
            if budget <= 0:
                break
            if caps[gid] > 0:
                keep[gid] -= 1
                caps[gid] -= 1
                budget -= 1
    else:
        for g in groups:
            if g.prunable:
                keep[g.id] = g.size - math.floor(policy.ratio_of(g) * g.size + 1e-9)
    out = []
    for g in groups:
        k = max(keep[g.id], floors[g.id]) if g.prunable else g.size
        if g.prunable and policy.round_to and k < g.size:
            q = policy.round_to // math.gcd(policy.round_to, channels_per_class(deps, g.id))
            k = _round(k, g.size, floors[g.id], q)
        out.append(min(k, g.size))
    return out


def lone_keep(size: int, policy: Policy) -> int:
    """The keep count ``keep_counts`` gives one free group of ``size`` one-channel classes (nothing pinned): how
    many inner channels of each fused expert stay (``fxprune.experts``), by the rule every traced group follows
    (the ratio, or the global budget with its per-group cap, then ``min_channels`` and ``round_to``)."""
    floor = max(policy.min_channels, 1)
    cut = math.floor(policy.ratio * size + 1e-9)
    if policy.global_ranking:
        cut = min(cut, size - floor, math.floor(policy.max_group_ratio * size))
    keep = max(size - cut, floor)
    if policy.round_to and keep < size:
        keep = _round(keep, size, floor, policy.round_to)
    return min(keep, size)


def select_channels(
    deps: DependencyResult,
    groups: tuple[ChannelGroup, ...],
    scores: list[np.ndarray],
    policy: Policy,
) -> PruningPlan:
    """Keep every pinned channel plus the highest-scoring free ones, up to each group's keep count.

    Ties break by channel position, so the result is deterministic.
    """
    sol = deps.solution
    kept_all: list[tuple[int, ...]] = []
    dropped: list[int] = []
    for group, classes, n_keep in zip(groups, sol.groups, keep_counts(deps, groups, scores, policy), strict=True):
        positions = np.arange(len(classes))
        if n_keep >= len(classes):
            kept_all.append(tuple(positions.tolist()))
            continue
        pinned = sol.pinned[classes]
        free = positions[~pinned]
        n_free_keep = n_keep - int(pinned.sum())
        order = np.lexsort((free, -scores[group.id][free]))  # best first; ties by position
        keep_mask = pinned.copy()
        keep_mask[free[order[:n_free_keep]]] = True
        kept_all.append(tuple(positions[keep_mask].tolist()))
        dropped.extend(classes[~keep_mask].tolist())
    ratio = policy.ratio
    return PruningPlan(ratio=ratio, groups=groups, kept=tuple(kept_all), dropped_labels=tuple(sorted(dropped)))


def plan_from_kept(deps: DependencyResult, groups: tuple[ChannelGroup, ...], kept: list[tuple[int, ...]], ratio: float) -> PruningPlan:
    """Rebuild a plan from kept positions per group (used when replaying a saved plan)."""
    sol = deps.solution
    dropped: list[int] = []
    for classes, keep in zip(sol.groups, kept, strict=True):
        mask = np.ones(len(classes), dtype=bool)
        mask[list(keep)] = False
        dropped.extend(int(c) for c in classes[mask])
    return PruningPlan(ratio=ratio, groups=groups, kept=tuple(tuple(k) for k in kept), dropped_labels=tuple(sorted(dropped)))
