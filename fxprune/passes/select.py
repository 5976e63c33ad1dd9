"""Describe the coupled groups and choose which channels of each group to keep."""

from __future__ import annotations

import math

import numpy as np

from fxprune.depgraph import space_label
from fxprune.passes.dependency import DependencyResult
from fxprune.plan import ChannelGroup, PruningPlan


def describe_groups(deps: DependencyResult) -> tuple[ChannelGroup, ...]:
    """Turn the solved classes into readable ``ChannelGroup`` records (members, pins, reasons)."""
    sol = deps.solution
    members: list[list[str]] = [[] for _ in sol.groups]
    for value in deps.params:
        for d in range(len(deps.value_shapes[value])):
            space = (value, d)
            if space not in sol.offsets:
                continue
            for g in np.unique(sol.class_group[sol.space_labels(space)]):
                if g >= 0:
                    members[g].append(space_label(space))
    out = []
    for g, classes in enumerate(sol.groups):
        reasons = list(dict.fromkeys(sol.class_pin[c] for c in classes if sol.class_pin[c]))
        out.append(
            ChannelGroup(
                id=g,
                size=len(classes),
                producers=tuple(space_label(s) for s in sol.group_producers[g]),
                members=tuple(members[g]),
                n_pinned=sum(1 for c in classes if sol.class_pin[c]),
                pin_reasons=tuple(reasons),
            )
        )
    return tuple(out)


def select_channels(
    deps: DependencyResult, groups: tuple[ChannelGroup, ...], scores: np.ndarray, ratio: float
) -> PruningPlan:
    """Remove ``floor(ratio * size)`` lowest-scoring free channels of every group (at least one is kept).

    Ties break by class order, so the result is deterministic.
    """
    sol = deps.solution
    kept_all: list[tuple[int, ...]] = []
    dropped: list[int] = []
    for group, classes in zip(groups, sol.groups, strict=True):
        positions = np.arange(len(classes))
        free = np.array([not sol.class_pin[c] for c in classes], dtype=bool)
        n_drop = min(math.floor(ratio * len(classes) + 1e-9), int(free.sum()), len(classes) - 1)
        if not group.prunable or n_drop <= 0:
            kept_all.append(tuple(int(p) for p in positions))
            continue
        cand = positions[free]
        order = np.lexsort((cand, scores[classes[cand]]))
        drop_pos = np.sort(cand[order[:n_drop]])
        mask = np.ones(len(classes), dtype=bool)
        mask[drop_pos] = False
        kept_all.append(tuple(int(p) for p in positions[mask]))
        dropped.extend(int(c) for c in classes[drop_pos])
    return PruningPlan(ratio=ratio, groups=groups, kept=tuple(kept_all), dropped_labels=tuple(sorted(dropped)))
