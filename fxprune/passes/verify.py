"""Proofs that a pruned model is right: predicted shapes, and the mask-equivalence oracle.

The oracle runs the ORIGINAL graph in float64 with every removed channel zeroed right after the node that
produces it, and compares with the pruned model in float64. For graphs of linear maps, pointwise ops,
pooling, concat/split and reshapes this equality is exact; it cannot hold where a removed channel enters a
statistic over channels (LayerNorm over the pruned dim), which the dependency graph records as inexact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import InvariantError
from fxprune.outputs import tensors_of
from fxprune.passes.dependency import DependencyResult
from fxprune.passes.shapes import record_shapes
from fxprune.plan import PruningPlan

Shape = tuple[int, ...]


def check_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...], expected: dict[str, Shape]) -> None:
    """Run the pruned graph and require every value to have exactly its predicted shape.

    Raises:
        InvariantError: naming the first node whose shape differs (a stale literal or a missing rule).
    """
    actual, _ = record_shapes(gm, example_inputs, meta=True)
    by_name = {n.name: n for n in gm.graph.nodes}
    for value, shape in actual.items():
        want = expected.get(value)
        if want is not None and tuple(want) != tuple(shape):
            node = by_name.get(value.split("#")[0])
            where = node.format_node() if node is not None else value
            raise InvariantError(f"after pruning, {where} has shape {tuple(shape)} but {tuple(want)} was planned")


@dataclass(frozen=True)
class OracleReport:
    """Outcome of the mask-equivalence check.

    Attributes:
        applicable: False when a removed channel passes through an op that makes equality inexact.
        reason: why not applicable ("" when applicable).
        max_abs_diff: largest |pruned - masked original| over all outputs (float64).
        passed: True when applicable and within tolerance.
    """

    applicable: bool
    reason: str
    max_abs_diff: float
    passed: bool


class _MaskedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, zero: dict[str, list[tuple[int, torch.Tensor]]]) -> None:
        super().__init__(gm)
        self.zero = zero

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            return self._mask(n.name, out)
        if isinstance(out, (tuple, list)) and any(f"{n.name}#{i}" in self.zero for i in range(len(out))):
            masked = [self._mask(f"{n.name}#{i}", t) if isinstance(t, torch.Tensor) else t for i, t in enumerate(out)]
            return type(out)(masked)
        return out

    def _mask(self, value: str, t: torch.Tensor) -> torch.Tensor:
        for dim, idx in self.zero.get(value, ()):
            t = t.index_fill(dim, idx, 0)
        return t


def _double(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def mask_oracle(
    original: fx.GraphModule,
    pruned: fx.GraphModule,
    deps: DependencyResult,
    plan: PruningPlan,
    example_inputs: tuple[Any, ...],
    tol: float = 1e-6,
) -> OracleReport:
    """Compare the pruned model with the original whose removed channels are zeroed (both float64, eval).

    ``original`` must be an unpruned copy of the traced graph the plan was computed on. Neither argument
    is modified. Tolerance: |a - b| <= tol * max|b| per output (relative to the output's scale).
    """
    sol = deps.solution
    dropped = plan.dropped_mask(sol.n_classes)
    for space, reason in deps.dep.inexact.items():
        if dropped[sol.space_labels(space)].any():
            return OracleReport(False, reason, float("nan"), False)
    zero: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for space in sol.offsets:
        value, dim = space
        if value.startswith("param:"):
            continue
        idx = np.nonzero(dropped[sol.space_labels(space)])[0]
        if len(idx):
            zero.setdefault(value, []).append((dim, torch.as_tensor(idx, dtype=torch.long)))
    ref_model = copy.deepcopy(original).double().eval()
    new_model = copy.deepcopy(pruned).double().eval()
    inputs = _double(example_inputs)
    with torch.no_grad():
        ref = tensors_of(_MaskedInterpreter(ref_model, zero).run(*inputs))
        got = tensors_of(new_model(*inputs))
    if len(ref) != len(got):
        raise InvariantError(f"pruned model returns {len(got)} tensors, the original {len(ref)}")
    worst = 0.0
    passed = True
    for a, b in zip(got, ref, strict=True):
        if a.shape != b.shape:
            raise InvariantError(f"pruned output shape {tuple(a.shape)} differs from original {tuple(b.shape)}")
        if not b.is_floating_point():
            passed &= bool(torch.equal(a, b))
            continue
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        peak = float(b.abs().max()) if b.numel() else 0.0
        scale = peak if peak > 0 else 1.0
        worst = max(worst, diff)
        passed &= diff <= tol * scale
    return OracleReport(True, "", worst, passed)
