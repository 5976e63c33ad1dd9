"""The channel-dependency graph: channel spaces, exact couplings between them, and their solution.

A *space* is one dimension of one value: ``(value, dim)``. A value is a tensor produced by an FX node
(``"conv1"``), one element of a node's tuple output (``"split#1"``), or a parameter/buffer
(``"param:layer1.0.conv1.weight"``). A *coupling* says that index ``i`` of space A and index ``j`` of space
B must be kept or removed together; identity couplings pair equal-sized spaces index by index, mapped
couplings carry explicit index arrays (cat offsets, split slices, flatten blocks, grouped-conv strides).

The couplings form a multigraph whose nodes are spaces (``DependencyGraph.graph`` gives it as a
``networkx.MultiGraph``). Solving them gives *channel classes* (connected components over individual
indices, computed with scipy), and classes that share a *producer* space (a parameter dim that creates
channels: a conv's output filters) form a *coupled group*, the unit a pruning ratio applies to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fxprune.errors import InvariantError

SpaceKey = tuple[str, int]
Coupling = tuple[SpaceKey, SpaceKey, "np.ndarray | None", "np.ndarray | None", str]


def param_value(qualname: str) -> str:
    """Return the value name of a parameter or buffer."""
    return f"param:{qualname}"


def space_label(space: SpaceKey) -> str:
    """Return a readable label for a space, e.g. ``layer1.conv.weight[0]``."""
    value, dim = space
    name = value[len("param:") :] if value.startswith("param:") else value
    return f"{name}[{dim}]"


@dataclass
class DependencyGraph:
    """Mutable builder of spaces and couplings; rules write into it through ``RuleContext``.

    Attributes:
        sizes: size of every registered space.
        couplings: every coupling as ``(a, b, a_index, b_index, why)`` (indices None = identity), in the
            order the rules stated them; ``graph`` shows them as a networkx multigraph.
        pins: reason per pinned space (the first reason wins).
        producers: spaces whose indices are created by a parameter (prunable sources).
        inexact: node name -> reason, for ops where the mask oracle cannot hold exactly.
    """

    sizes: dict[SpaceKey, int] = field(default_factory=dict)
    couplings: list[Coupling] = field(default_factory=list)
    pins: dict[SpaceKey, str] = field(default_factory=dict)
    producers: list[SpaceKey] = field(default_factory=list)
    inexact: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> Any:
        """The space-level ``networkx.MultiGraph``, built on demand: nodes are spaces (with their ``size`` and
        ``pinned`` reason, "" when free); every edge
        carries its endpoints ``a``/``b``, ``a_index``/``b_index`` (None = identity) and ``why``.

        The rules append to ``couplings`` (a list append: networkx edges made the dependency pass 1.6x
        slower on timm's efficientnet_b0); solving reads the list directly.
        """
        import networkx as nx  # imported on demand: only the graph view needs it

        g = nx.MultiGraph()
        g.add_nodes_from((space, {"size": size, "pinned": self.pins.get(space, "")}) for space, size in self.sizes.items())
        g.add_edges_from((a, b, {"a": a, "b": b, "a_index": ai, "b_index": bi, "why": why})
                         for a, b, ai, bi, why in self.couplings)
        return g

    def add_space(self, space: SpaceKey, size: int) -> None:
        """Register a space of ``size`` indices (idempotent; sizes must agree)."""
        old = self.sizes.get(space)
        if old is None:
            self.sizes[space] = int(size)
        elif old != size:
            raise InvariantError(f"space {space_label(space)} registered with sizes {old} and {size}")

    def couple(
        self,
        a: SpaceKey,
        b: SpaceKey,
        a_index: np.ndarray | None = None,
        b_index: np.ndarray | None = None,
        why: str = "",
    ) -> None:
        """Couple index ``a_index[k]`` of ``a`` with ``b_index[k]`` of ``b`` (identity when both are None)."""
        if a_index is None and b_index is None and self.sizes[a] != self.sizes[b]:
            raise InvariantError(
                f"identity coupling of {space_label(a)} (size {self.sizes[a]}) and "
                f"{space_label(b)} (size {self.sizes[b]}) ({why})"
            )
        self.couplings.append((a, b, a_index, b_index, why))

    def pin(self, space: SpaceKey, reason: str) -> None:
        """Forbid pruning any channel that touches ``space``."""
        self.pins.setdefault(space, reason)

    def produce(self, space: SpaceKey) -> None:
        """Mark ``space`` as a producer: its indices are channels a parameter creates."""
        self.producers.append(space)

    def solve(self) -> Solution:
        """Compute channel classes, pins and coupled groups from the couplings."""
        return _solve(self)


@dataclass(frozen=True)
class Solution:
    """The solved dependency graph.

    Attributes:
        offsets: first element id of every space (elements of a space are contiguous).
        labels: class label of every element.
        n_classes: number of classes.
        class_pin: per class, the pin reason or "" when free.
        class_group: per class, the group id or -1 when the class has no producer.
        groups: per group, the sorted class labels it holds (canonical order: by first element).
        group_producers: per group, its producer spaces.
    """

    offsets: dict[SpaceKey, int]
    sizes: dict[SpaceKey, int]
    labels: np.ndarray
    n_classes: int
    class_pin: list[str]
    class_group: np.ndarray
    groups: list[np.ndarray]
    group_producers: list[list[SpaceKey]]

    @functools.cached_property
    def pinned(self) -> np.ndarray:
        """Per class, whether it is pinned (``class_pin`` as a boolean array)."""
        return np.fromiter(map(bool, self.class_pin), dtype=bool, count=self.n_classes)

    def groups_in(self, space: SpaceKey) -> list[int]:
        """Ids of the groups with a channel in ``space``, ascending (one comparison when there is one group)."""
        gids = self.class_group[self.space_labels(space)]
        if len(gids) and (gids == gids[0]).all():
            return [int(gids[0])] if gids[0] >= 0 else []
        return [g for g in unique(gids).tolist() if g >= 0]

    def space_labels(self, space: SpaceKey) -> np.ndarray:
        """Return the class label of each index of ``space``."""
        start = self.offsets[space]
        return self.labels[start : start + self.sizes[space]]


def unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``values``: ``np.unique`` by sorting, about 10x faster than numpy 2.4's hashing."""
    flat = np.sort(np.asarray(values).ravel())
    if len(flat) < 2:
        return flat
    keep = np.empty(len(flat), dtype=bool)
    keep[0] = True
    np.not_equal(flat[1:], flat[:-1], out=keep[1:])
    return flat[keep]


def _space_classes(dep: DependencyGraph, index: dict[SpaceKey, int]) -> tuple[int, np.ndarray]:
    """Components of the spaces under identity couplings alone: (count, component of every space).

    Identity couplings (same shape, index by index) are nearly all of them, and they join whole spaces: every
    space of a component has one size and maps index by index onto the component's first space, its
    *representative*. Only representatives then need per-index ids (a tenth of them on a MobileNetV3).
    """
    pairs = [(index[a], index[b]) for a, b, ai, bi, _ in dep.couplings if ai is None and bi is None]
    n = len(index)
    r = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
    c = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
    return connected_components(coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n)).tocsr(), directed=False)


def _mapped_endpoints(
    dep: DependencyGraph, index: dict[SpaceKey, int], rep_start: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Representative element ids of both ends of every index-mapped coupling."""
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for a, b, ai, bi, _ in dep.couplings:
        if ai is None and bi is None:
            continue
        ai = np.arange(len(bi)) if ai is None else np.asarray(ai, dtype=np.int64)
        bi = np.arange(len(ai)) if bi is None else np.asarray(bi, dtype=np.int64)
        rows.append(rep_start[index[a]] + ai)
        cols.append(rep_start[index[b]] + bi)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def _class_pins(dep: DependencyGraph, offsets: dict[SpaceKey, int], labels: np.ndarray, n_classes: int) -> list[str]:
    """Per class, the reason of the first pin that reaches it, or ""."""
    pin_of = np.full(n_classes, -1, dtype=np.int64)
    reasons: list[str] = []
    for space, reason in dep.pins.items():  # first pin wins
        labs = labels[offsets[space] : offsets[space] + dep.sizes[space]]
        free = labs[pin_of[labs] < 0]
        if len(free):
            pin_of[free] = len(reasons)
            reasons.append(f"{reason} (at {space_label(space)})")
    table = np.asarray(["", *reasons], dtype=object)
    return table[pin_of + 1].tolist()


def _number_groups(
    labs: np.ndarray, class_comp: np.ndarray, signature: np.ndarray, n_classes: int
) -> tuple[np.ndarray, int]:
    """Group id per class: one id per distinct (component, signature) key among ``labs``, numbered by the
    smallest class label holding the key (deterministic); -1 for classes not in ``labs``."""
    class_group = np.full(n_classes, -1, dtype=np.int64)
    if not len(labs):
        return class_group, 0
    comp, sig = class_comp[labs], signature[labs]
    order = np.lexsort((labs, sig, comp))
    comp, sig, sorted_labs = comp[order], sig[order], labs[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (comp[1:] != comp[:-1]) | (sig[1:] != sig[:-1])
    key = np.cumsum(new) - 1
    first = sorted_labs[new]  # labels are the last sort key: the first of a run is its smallest
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    class_group[sorted_labs] = rank[key]
    return class_group, len(first)


def _solve(dep: DependencyGraph) -> Solution:
    spaces = list(dep.sizes)
    n_spaces = len(spaces)
    sizes = np.fromiter(dep.sizes.values(), dtype=np.int64, count=n_spaces)
    starts = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    offsets = dict(zip(spaces, starts.tolist(), strict=True))
    index = {space: i for i, space in enumerate(spaces)}
    # 1. Whole spaces joined by identity couplings; each component is represented by its first space.
    n_comp, comp_of = _space_classes(dep, index)
    rep = np.full(n_comp, n_spaces, dtype=np.int64)
    np.minimum.at(rep, comp_of, np.arange(n_spaces))
    rep_of = rep[comp_of]  # per space, its representative
    is_rep = rep_of == np.arange(n_spaces)
    rep_sizes = np.where(is_rep, sizes, 0)
    rep_start = np.cumsum(rep_sizes) - rep_sizes  # per representative, its first element id
    n_rep = int(rep_sizes.sum())
    # 2. Index-mapped couplings (cat, split, flatten, groups) between representatives' elements.
    r, c = _mapped_endpoints(dep, index, rep_start[rep_of])
    adjacency = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n_rep, n_rep)).tocsr()
    n_classes, raw = connected_components(adjacency, directed=False)
    # Canonical labels: classes numbered by their first element over all spaces, so results never depend on
    # scipy's order. A representative's element i stands for element i of each space in its component; the
    # first of those is in the component's first space.
    rep_spaces = np.nonzero(is_rep)[0]
    comp_first = np.full(n_comp, total, dtype=np.int64)
    np.minimum.at(comp_first, comp_of, starts)
    local = np.arange(n_rep, dtype=np.int64) - np.repeat(rep_start[rep_spaces], sizes[rep_spaces])
    elem_comp = np.repeat(comp_of[rep_spaces], sizes[rep_spaces])  # component of every representative element
    first = np.full(n_classes, total, dtype=np.int64)
    np.minimum.at(first, raw, comp_first[elem_comp] + local)
    order = np.argsort(first, kind="stable")
    rank = np.empty(n_classes, dtype=np.int64)
    rank[order] = np.arange(n_classes)
    rep_labels = rank[raw]
    within = np.arange(total, dtype=np.int64) - np.repeat(starts, sizes)
    labels = rep_labels[np.repeat(rep_start[rep_of], sizes) + within]  # every element, through its representative

    class_pin = _class_pins(dep, offsets, labels, n_classes)

    # Groups: producers that share a class belong together (bipartite components producer <-> class).
    producers = list(dict.fromkeys(dep.producers))
    p_rows: list[np.ndarray] = []
    p_cols: list[np.ndarray] = []
    for j, space in enumerate(producers):
        labs = unique(labels[offsets[space] : offsets[space] + dep.sizes[space]])
        p_rows.append(np.full(len(labs), j, dtype=np.int64))
        p_cols.append(len(producers) + labs)
    n_nodes = len(producers) + n_classes
    if p_rows:
        pr, pc = np.concatenate(p_rows), np.concatenate(p_cols)
    else:
        pr = pc = np.zeros(0, dtype=np.int64)
    bip = coo_matrix((np.ones(len(pr), dtype=np.int8), (pr, pc)), shape=(n_nodes, n_nodes)).tocsr()
    _, comp = connected_components(bip, directed=False)
    has_producer = np.zeros(n_classes, dtype=bool)
    if len(pc):
        has_producer[pc - len(producers)] = True
    class_comp = comp[len(producers) :]
    # Within one producer component, channels that appear in different tensors are different groups (a
    # fused qkv projection: the q/k head dims and the v head dims), so a ratio thins each of them evenly
    # and never empties one. The signature of a class is a hash of the set of spaces it appears in.
    # A class is in a space exactly when it is in the space's representative, so the hash sums, per
    # (class, component) pair, the weights of the component's spaces (uint64 sums wrap: order-free).
    weights = np.random.default_rng(0).integers(1, 2**63, size=n_spaces, dtype=np.uint64)
    comp_weight = np.zeros(n_comp, dtype=np.uint64)
    np.add.at(comp_weight, comp_of, weights)
    # Each (class, component) pair once: a sparse incidence matrix sums duplicate entries in C.
    incidence = coo_matrix((np.ones(n_rep, dtype=np.int8), (rep_labels, elem_comp)), shape=(n_classes, n_comp)).tocsr()
    incidence.sum_duplicates()
    signature = np.zeros(n_classes, dtype=np.uint64)
    np.add.at(signature, np.repeat(np.arange(n_classes), np.diff(incidence.indptr)), comp_weight[incidence.indices])
    class_group, n_groups = _number_groups(np.nonzero(has_producer)[0], class_comp, signature, n_classes)
    members = np.nonzero(class_group >= 0)[0]
    order = members[np.argsort(class_group[members], kind="stable")]
    bounds = np.searchsorted(class_group[order], np.arange(n_groups + 1))
    groups = [order[bounds[g] : bounds[g + 1]] for g in range(n_groups)]
    group_producers: list[list[SpaceKey]] = [[] for _ in range(n_groups)]
    for space in producers:
        for g in unique(class_group[labels[offsets[space] : offsets[space] + dep.sizes[space]]]):
            if g >= 0:
                group_producers[int(g)].append(space)
    return Solution(
        offsets=offsets,
        sizes=dict(dep.sizes),
        labels=labels,
        n_classes=n_classes,
        class_pin=class_pin,
        class_group=class_group,
        groups=groups,
        group_producers=group_producers,
    )
