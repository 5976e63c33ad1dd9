"""Proofs that a pruned model is right: predicted shapes, and the mask-equivalence oracle.

The oracle runs the ORIGINAL graph in float64 with every removed channel zeroed right after the node that
produces it, and compares with the pruned model in float64. For graphs of linear maps, pointwise ops,
pooling, concat/split and reshapes this equality is exact. A normalisation over channels (LayerNorm,
RMSNorm) whose normalised dim lost channels is computed in the reference over the kept channels only,
which is what the pruned model computes, so it is exact too. Ops the reference cannot model that way are
recorded as inexact by their rule, and the oracle then says "not applicable".
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.errors import InvariantError, ShapeError
from fxprune.outputs import tensors_of
from fxprune.passes.dependency import DependencyResult
from fxprune.passes.shapes import record_shapes
from fxprune.plan import PruningPlan
from fxprune.rules.common import call_arg
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


def check_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...], expected: dict[str, Shape]) -> None:
    """Run the pruned graph and require every value to have exactly its predicted shape.

    Raises:
        InvariantError: naming the first node whose shape differs (a stale literal or a missing rule).
    """
    try:
        actual, _ = record_shapes(gm, example_inputs, meta=True)
    except ShapeError as e:  # the inputs ran before pruning: the rewrite is at fault, not the user's inputs
        detail = str(e).split(": ", 1)[-1]
        raise InvariantError(f"after pruning, the graph no longer runs (a stale literal size?): {detail}") from e
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


def zero_masks(deps: DependencyResult, dropped: np.ndarray) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """``value -> [(dim, indices)]``: where the classes ``dropped`` (a mask over class labels) appear in the
    graph's values (parameters excluded), for a ``MaskedInterpreter``."""
    sol = deps.solution
    zero: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for space in sol.offsets:
        value, dim = space
        if value.startswith("param:"):
            continue
        idx = np.nonzero(dropped[sol.space_labels(space)])[0]
        if len(idx):
            zero.setdefault(value, []).append((dim, torch.as_tensor(idx, dtype=torch.long)))
    return zero


class MaskedInterpreter(fx.Interpreter):
    """Runs a graph with the channels ``zero`` names set to zero right after the node that makes them (and
    norms over pruned channels normalising over the kept ones): the pruned model, at the original widths."""

    def __init__(self, gm: fx.GraphModule, zero: dict[str, list[tuple[int, torch.Tensor]]]) -> None:
        super().__init__(gm)
        self.zero = zero

    def run_node(self, n: fx.Node) -> Any:
        out = self._norm_over_kept(n)
        if out is None:
            out = super().run_node(n)
        if n.op == "get_attr" and isinstance(out, nn.Parameter) and n.name in self.zero:
            out = out.detach().clone()  # the model's own weight: masked in a copy, never in place (a buffer is
            # state: masked in place, as the pruned model's sliced one is updated in place)
        if isinstance(out, torch.Tensor):
            return self._mask(n.name, out)
        if isinstance(out, (tuple, list)) and any(f"{n.name}#{i}" in self.zero for i in range(len(out))):
            masked = [self._mask(f"{n.name}#{i}", t) if isinstance(t, torch.Tensor) else t for i, t in enumerate(out)]
            return type(out)(masked)
        return out

    def _norm_over_kept(self, n: fx.Node) -> torch.Tensor | None:
        """A LayerNorm/RMSNorm/GroupNorm whose normalised channels lost some, over the kept ones only; else None."""
        spec = norm_spec(n, self._module_of)
        if spec is None or not isinstance(spec.x, fx.Node):
            return None
        x = self.env[spec.x]
        if not isinstance(x, torch.Tensor) or x.dim() <= spec.dim:
            return None
        dim = spec.dim % x.dim()
        gone = [idx for d, idx in self.zero.get(spec.x.name, ()) if d == dim]
        if not gone:
            return None
        keep_mask = torch.ones(x.shape[dim], dtype=torch.bool)
        for idx in gone:
            keep_mask[idx] = False
        keep = torch.nonzero(keep_mask).flatten()
        w, b = self._arg(spec.weight), self._arg(spec.bias)
        w = w.index_select(0 if spec.kind == "group_norm" else -1, keep) if isinstance(w, torch.Tensor) else None
        b = b.index_select(0 if spec.kind == "group_norm" else -1, keep) if isinstance(b, torch.Tensor) else None
        w = w.to(x.dtype) if isinstance(w, torch.Tensor) and w.is_floating_point() else w  # a module's own weight
        b = b.to(x.dtype) if isinstance(b, torch.Tensor) and b.is_floating_point() else b
        xs = x.index_select(dim, keep)
        if spec.kind == "group_norm":
            ys = F.group_norm(xs, int(spec.shape), w, b, 1e-5 if spec.eps is None else float(spec.eps))
        elif spec.kind == "layer_norm":
            shape = (*tuple(spec.shape)[:-1], len(keep))
            ys = F.layer_norm(xs, shape, w, b, 1e-5 if spec.eps is None else float(spec.eps))
        else:
            shape = (*tuple(spec.shape)[:-1], len(keep))
            ys = F.rms_norm(xs, shape, w, None if spec.eps is None else float(spec.eps))
        return torch.zeros_like(x).index_copy(dim, keep, ys)

    def _module_of(self, target: str) -> torch.nn.Module:
        return self.fetch_attr(target)

    def _arg(self, a: Any) -> Any:
        return self.env[a] if isinstance(a, fx.Node) else a

    def _mask(self, value: str, t: torch.Tensor) -> torch.Tensor:
        """Zero the removed channels of ``t`` in place where possible: a later in-place op on an alias of the
        node (``skip = a; a += b``) must see the same tensor, as in eager PyTorch."""
        for dim, idx in self.zero.get(value, ()):
            expanded = any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True))
            if expanded:  # several elements share memory: a masked copy
                t = t.index_fill(dim, idx, 0)
                continue
            try:
                t.index_fill_(dim, idx, 0)
            except RuntimeError:  # otherwise not writable in place (an overlapping view)
                t = t.index_fill(dim, idx, 0)
        return t


class NormSpec(NamedTuple):
    """A normalisation over channels: its kind, input, normalised dim and arguments."""

    kind: str  # "layer_norm", "rms_norm" or "group_norm"
    x: Any  # the input node
    dim: int  # the channel dim the statistics span (-1, or 1 for GroupNorm)
    shape: Any  # normalized_shape, or the group count for GroupNorm
    weight: Any  # node, tensor or None
    bias: Any
    eps: Any


def norm_spec(n: fx.Node, module_of: Any) -> NormSpec | None:
    """The ``NormSpec`` of a LayerNorm/RMSNorm/GroupNorm node (module or function), else None."""
    if n.op == "call_module" and n.args:
        m = module_of(str(n.target))
        for cls, kind in ((torch.nn.LayerNorm, "layer_norm"), (torch.nn.RMSNorm, "rms_norm")):
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return NormSpec(kind, n.args[0], -1, m.normalized_shape, m.weight, getattr(m, "bias", None), m.eps)
        if isinstance(m, torch.nn.GroupNorm) and type(m).forward is torch.nn.GroupNorm.forward:
            return NormSpec("group_norm", n.args[0], 1, m.num_groups, m.weight, m.bias, m.eps)
        return None
    if n.op != "call_function" or not n.args:
        return None
    if n.target in (F.layer_norm, torch.layer_norm):
        return NormSpec("layer_norm", n.args[0], -1, call_arg(n, 1, "normalized_shape"), call_arg(n, 2, "weight"),
                        call_arg(n, 3, "bias"), call_arg(n, 4, "eps", 1e-5))
    if n.target in (F.rms_norm, torch.rms_norm):
        return NormSpec("rms_norm", n.args[0], -1, call_arg(n, 1, "normalized_shape"), call_arg(n, 2, "weight"), None,
                        call_arg(n, 3, "eps"))
    if n.target in (F.group_norm, torch.group_norm):
        return NormSpec("group_norm", n.args[0], 1, call_arg(n, 1, "num_groups"), call_arg(n, 2, "weight"),
                        call_arg(n, 3, "bias"), call_arg(n, 4, "eps", 1e-5))
    return None


def _double(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Every floating tensor in ``inputs`` in float64, at any depth (dicts, nested tuples and lists)."""
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, tuple(inputs))


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
    for space, reason in deps.couplings.inexact.items():
        if dropped[sol.space_labels(space)].any():
            return OracleReport(False, reason, float("nan"), False)
    zero = zero_masks(deps, dropped)
    inputs = _double(example_inputs)
    with _evaluated(original, pruned), torch.no_grad(), kept_buffers(original), kept_buffers(pruned):
        # neither model copied: the runs read every tensor in float64, a module's at a time
        ref = tensors_of(_MaskedFloat64(original, zero).run(*inputs))
        got = tensors_of(_Float64(pruned).run(*inputs))
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
    if not passed and _random(original, zero, inputs, ref):  # a second run only to explain a failure
        reason = ("the model's forward is random (two runs on the same input differ, e.g. torch.randn or "
                  "dropout that ignores eval mode): no oracle can compare it; make the eval forward deterministic")
        log.warning("fxprune: %s", reason)
        return OracleReport(False, reason, float("nan"), False)
    return OracleReport(True, "", worst, passed)


@contextlib.contextmanager
def _evaluated(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode, their flags restored afterwards."""
    flags = {m: m.training for g in models for m in g.modules()}
    try:
        for g in models:
            g.eval()
        yield
    finally:
        for m, training in flags.items():
            m.training = training


def _random(ref_model: fx.GraphModule, zero: dict[str, list[tuple[int, torch.Tensor]]], inputs: tuple[Any, ...],
            first: list[torch.Tensor]) -> bool:
    """Whether the masked reference gives other outputs on a second run with another random seed."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), kept_buffers(ref_model), _evaluated(ref_model):
        torch.manual_seed(torch.initial_seed() + 7919)
        again = tensors_of(_MaskedFloat64(ref_model, zero).run(*inputs))
    return any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, again, strict=True))


def _as_float64(t: Any) -> Any:
    """A float64 copy of a floating tensor (a copy even when it is float64: the run may write into it)."""
    return t.to(torch.float64, copy=True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


class _Float64(fx.Interpreter):
    """Runs a graph in float64 without a float64 copy of the model: each parameter or buffer read
    (``get_attr``) is a float64 copy, and each module call runs on float64 copies of that module's own
    tensors (``functional_call``), freed when it returns. Peak memory is the model plus its largest module
    in float64, not the whole model in float64; what a forward writes into its state goes to the copies."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _as_float64(super().get_attr(target, args, kwargs))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):  # no stateless API: a copy
            return copy.deepcopy(module).double()(*args, **kwargs)
        state = {name: _as_float64(t) for name, t in (*module.named_parameters(), *module.named_buffers())}
        if not state:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, tuple(args), dict(kwargs), tie_weights=True, strict=False)


class _MaskedFloat64(_Float64, MaskedInterpreter):
    """The masked reference (``MaskedInterpreter``) run in float64 a module at a time (``_Float64``)."""
