"""Frozen records of an analysis: coupled channel groups and the pruning plan chosen for them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must be pruned together, and everything they touch.

    Attributes:
        id: position of the group in the analysis (deterministic).
        size: number of channel classes (the unit a ratio counts).
        producers: parameter dims that create these channels, e.g. ``layer1.0.conv1.weight[0]``.
        members: every parameter dim sliced when a channel of the group is removed.
        n_pinned: classes that must be kept, with the reasons in ``pin_reasons``.
        pin_reasons: distinct reasons, first seen first.
    """

    id: int
    size: int
    producers: tuple[str, ...]
    members: tuple[str, ...]
    n_pinned: int
    pin_reasons: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        """Whether at least one channel of the group may be removed."""
        return self.n_pinned < self.size and self.size > 1

    @property
    def reason(self) -> str:
        """Why the group cannot be pruned ("" when it can)."""
        if self.prunable:
            return ""
        if self.size <= 1:
            return "a single channel: pruning it would empty the layer"
        return self.pin_reasons[0] if self.pin_reasons else "pinned"


@dataclass(frozen=True)
class PruningPlan:
    """Which channel classes of each group are kept.

    Attributes:
        ratio: the requested fraction of channels removed per prunable group.
        groups: the analysed groups.
        kept: per group, the kept positions in the group's canonical class order.
        dropped_labels: class labels removed (sorted), as used by the rewrite and the oracle.
    """

    ratio: float
    groups: tuple[ChannelGroup, ...]
    kept: tuple[tuple[int, ...], ...]
    dropped_labels: tuple[int, ...]

    @property
    def n_dropped(self) -> int:
        """Number of channel classes removed in total."""
        return len(self.dropped_labels)

    def dropped_mask(self, n_classes: int) -> np.ndarray:
        """Boolean mask over class labels, True where the class is removed."""
        mask = np.zeros(n_classes, dtype=bool)
        mask[list(self.dropped_labels)] = True
        return mask
