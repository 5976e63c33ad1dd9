"""The interface every channel rule writes through.

A rule is a function ``rule(node, ctx) -> None`` that states, for one FX node, which dims of its inputs,
outputs and parameters are coupled (and by which index map), which dims are pinned and why, and which
parameter dims produce new channels. Rules never look at other nodes' rules and never mutate anything
but the dependency graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from fxprune.depgraph import DependencyGraph, SpaceKey, param_value
from fxprune.passes.base import submodule

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Regroup:
    """A reshape that merges several dims into one, or splits one dim into several.

    ``product`` index ``f`` corresponds to index ``(f // inner_k) % size_k`` of factor ``k``. Only one
    factor can be coupled exactly to the product (the others are then pinned); which one is decided after
    the other couplings are known (see ``passes/dependency.py``).
    """

    node: str
    product: SpaceKey
    factors: tuple[SpaceKey, ...]
    factor_sizes: tuple[int, ...]


class RuleContext:
    """What a rule may ask and say about the node it handles."""

    def __init__(self, gm: fx.GraphModule, dep: DependencyGraph, canonical: dict[int, str]) -> None:
        self.gm = gm
        self.couplings = dep
        self.canonical = canonical
        self.node: fx.Node | None = None
        self.regroups: list[Regroup] = []
        self.value_shapes: dict[str, Shape] = {}
        self.query_heads = False  # prune_heads="query": query heads go inside each key/value group
        self.expanded: set[SpaceKey] = set()  # dims an expand made (copies of one slice)

    # ---- values and shapes -------------------------------------------------------------------
    def shape_of(self, value: str) -> Shape:
        """Return the recorded shape of a value."""
        return self.value_shapes[value]

    def tensor(self, arg: object) -> str | None:
        """Return the value name of ``arg`` when it is a node producing a single tensor, else None."""
        if isinstance(arg, fx.Node) and arg.name in self.value_shapes:
            return arg.name
        return None

    def out(self) -> str | None:
        """Return the value name of the current node's tensor output, or None."""
        assert self.node is not None
        return self.tensor(self.node)

    def ndim(self, value: str) -> int:
        """Return the rank of a value."""
        return len(self.value_shapes[value])

    def space(self, value: str, dim: int) -> SpaceKey:
        """Return (and register) the space of ``value`` at ``dim`` (negative dims allowed)."""
        shape = self.value_shapes[value]
        dim = dim % len(shape)
        key = (value, dim)
        self.couplings.add_space(key, shape[dim])
        return key

    def module(self) -> torch.nn.Module:
        """Return the submodule the current ``call_module`` node calls."""
        assert self.node is not None
        return submodule(self.gm, str(self.node.target))

    def param(self, owner: torch.nn.Module, attr: str) -> str | None:
        """Register a parameter/buffer of ``owner`` and return its value name (None if absent)."""
        t = getattr(owner, attr, None)
        if not isinstance(t, torch.Tensor):
            return None
        qual = self.canonical.get(id(t))
        if qual is None:
            return None
        value = param_value(qual)
        self.value_shapes.setdefault(value, tuple(t.shape))
        return value

    # ---- statements ------------------------------------------------------------------------
    def same(self, a: str, a_dim: int, b: str, b_dim: int, why: str = "") -> None:
        """Couple two dims index by index."""
        sa, sb = self.space(a, a_dim), self.space(b, b_dim)
        self.couplings.couple(sa, sb, why=why or self._why())

    def mapped(self, a: str, a_dim: int, a_index: np.ndarray, b: str, b_dim: int, b_index: np.ndarray) -> None:
        """Couple index ``a_index[k]`` of ``a`` at ``a_dim`` with ``b_index[k]`` of ``b`` at ``b_dim``."""
        sa, sb = self.space(a, a_dim), self.space(b, b_dim)
        self.couplings.couple(sa, sb, np.asarray(a_index, np.int64), np.asarray(b_index, np.int64), why=self._why())

    def pin(self, value: str, reason: str, dims: list[int] | None = None) -> None:
        """Pin some (default: all) dims of a value."""
        for d in range(self.ndim(value)) if dims is None else dims:
            self.couplings.pin(self.space(value, d), reason)

    def produce(self, value: str, dim: int) -> None:
        """Mark a parameter dim as creating channels."""
        self.couplings.produce(self.space(value, dim))

    def inexact(self, value: str, dim: int, reason: str) -> None:
        """Record that pruning this dim breaks exact mask equivalence (e.g. normalisation over it)."""
        self.couplings.inexact.setdefault(self.space(value, dim), reason)

    def regroup(self, product: SpaceKey, factors: list[SpaceKey]) -> None:
        """Defer a merge/split coupling (see ``Regroup``)."""
        assert self.node is not None
        sizes = tuple(self.couplings.sizes[f] for f in factors)
        self.regroups.append(Regroup(self.node.name, product, tuple(factors), sizes))

    def _why(self) -> str:
        return self.node.name if self.node is not None else ""


def node_tensor_args(node: fx.Node) -> list[fx.Node]:
    """Return every node among ``node``'s (possibly nested) args and kwargs, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found
