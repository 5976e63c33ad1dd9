"""The dependency solver against a plain element-by-element reference, on random coupling graphs.

``depgraph._solve`` joins whole spaces under identity couplings first and gives per-index ids only to one
representative per component; the reference below unions every index of every space, one at a time, and
states the canonical numbering, pins and groups directly. Both must give the same Solution.
"""

from __future__ import annotations

import numpy as np
import pytest

from fxprune.depgraph import DependencyGraph, SpaceKey


def _random_graph(seed: int) -> DependencyGraph:
    rng = np.random.default_rng(seed)
    dep = DependencyGraph()
    spaces: list[SpaceKey] = []
    for i in range(int(rng.integers(3, 25))):
        space = (f"v{i}", int(rng.integers(0, 3)))
        if space not in dep.sizes:
            dep.add_space(space, int(rng.integers(1, 7)))
            spaces.append(space)
    for _ in range(int(rng.integers(0, 30))):
        a, b = (spaces[int(k)] for k in rng.integers(0, len(spaces), 2))
        if rng.random() < 0.7:
            same = [s for s in spaces if dep.sizes[s] == dep.sizes[a]]
            dep.couple(a, same[int(rng.integers(0, len(same)))], why="identity")
        else:
            n = int(rng.integers(1, min(dep.sizes[a], dep.sizes[b]) + 1))
            ai = rng.choice(dep.sizes[a], n, replace=False)
            bi = rng.choice(dep.sizes[b], n, replace=False)
            dep.couple(a, b, None if rng.random() < 0.15 else ai, bi, why="mapped")  # None: a's first n indices
    for _ in range(int(rng.integers(0, 4))):
        dep.pin(spaces[int(rng.integers(0, len(spaces)))], f"pin {rng.integers(0, 100)}")
    for _ in range(int(rng.integers(1, 6))):
        dep.produce(spaces[int(rng.integers(0, len(spaces)))])
    return dep


def _reference(dep: DependencyGraph) -> dict[str, object]:
    spaces = list(dep.sizes)
    elements = [(s, i) for s in spaces for i in range(dep.sizes[s])]
    parent = {e: e for e in elements}

    def find(e: tuple[SpaceKey, int]) -> tuple[SpaceKey, int]:
        while parent[e] != e:
            e = parent[e]
        return e

    for a, b, ai, bi, _ in dep.couplings:
        if ai is None and bi is None:
            ai = bi = np.arange(dep.sizes[a])
        ai = np.arange(len(bi)) if ai is None else ai
        bi = np.arange(len(ai)) if bi is None else bi
        for i, j in zip(ai.tolist(), bi.tolist(), strict=True):
            parent[find((a, i))] = find((b, j))
    label: dict[tuple[SpaceKey, int], int] = {}
    root_label: dict[tuple[SpaceKey, int], int] = {}
    for e in elements:  # classes numbered by their first element
        label[e] = root_label.setdefault(find(e), len(root_label))
    n = len(root_label)
    pins = [""] * n
    for space, reason in dep.pins.items():
        for i in range(dep.sizes[space]):
            if not pins[label[(space, i)]]:
                pins[label[(space, i)]] = f"{reason} (at {space[0]}[{space[1]}])"
    producers = list(dict.fromkeys(dep.producers))
    comp = {c: c for c in range(n)}  # classes joined through shared producers

    def croot(c: int) -> int:
        while comp[c] != c:
            c = comp[c]
        return c

    produced: set[int] = set()
    for p in producers:
        labs = sorted({label[(p, i)] for i in range(dep.sizes[p])})
        produced.update(labs)
        for c in labs[1:]:
            comp[croot(c)] = croot(labs[0])
    where = {c: frozenset(s for s in spaces for i in range(dep.sizes[s]) if label[(s, i)] == c) for c in produced}
    keys: dict[tuple[int, frozenset[SpaceKey]], list[int]] = {}
    for c in sorted(produced):
        keys.setdefault((croot(c), where[c]), []).append(c)
    groups = sorted(keys.values(), key=lambda cs: cs[0])
    group_producers = [[p for p in producers if any(label[(p, i)] in g for i in range(dep.sizes[p]))] for g in groups]
    return {"labels": [label[e] for e in elements], "n": n, "pins": pins, "groups": groups,
            "producers": group_producers}


@pytest.mark.parametrize("seed", range(60))
def test_solver_equals_element_by_element_reference(seed: int) -> None:
    dep = _random_graph(seed)
    sol = dep.solve()
    ref = _reference(dep)
    assert sol.labels.tolist() == ref["labels"]
    assert sol.n_classes == ref["n"]
    assert sol.class_pin == ref["pins"]
    assert [g.tolist() for g in sol.groups] == ref["groups"]
    assert sol.group_producers == ref["producers"]
    for g, classes in enumerate(ref["groups"]):
        assert all(sol.class_group[c] == g for c in classes)
