"""Least-squares reconstruction of the consumers of removed channels (``reconstruct=True``).

Once the plan says which channels go, every linear consumer of removed channels (``nn.Linear``, Hugging Face's
``Conv1D`` and ungrouped ``nn.Conv2d``, whose input is read as its unfolded patches) gets its kept input
columns refitted by least squares on the calibration batches (``passes/refit.py``: the channel-pruning
reconstruction of He et al. 2017 and ThiNet; FLAP's bias compensation where the layer has a bias). So does
every linear layer the graph runs after one of them, with all its inputs kept: its input is what the pruned
upstream gives, and its refit toward the unpruned output makes up for that (a ResNet block whose shortcut
lost channels but whose own convs did not; a language model's later q/k/v/gate/up and its head). The refit
changes the private copy's weights before the rewrite, so the mask oracle proves ``pruned == refitted
original with the removed channels zeroed``: exactness is kept.

Sequential, as SlimGPT and GPTQ are: layers are fitted in graph order, each on what the already pruned and
refitted upstream gives it (the graph runs with the removed channels of the layers fitted so far zeroed),
toward what the unpruned model computed: the layer's own output, or, for the last layer of a residual
branch (its output added straight to the stream, or through an eval-mode BatchNorm), the unpruned sum less
what the pruned stream brings; so each refit also makes up for what the layers before it lost.
A graph specialised to the example's shapes cannot run batches of other shapes: then every consumer is fitted
on the unpruned model's inputs (and the layers after them are left: on those inputs a refit changes nothing) (the eager copy runs them), a few layers per run so that the float64
statistics held at once stay under ``H_BUDGET_BYTES``. Across the parts of a model pruned part by part,
each part is fitted on what the parts pruned before it give it (``partial.compile_parts``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ArgumentError
from fxprune.passes.dependency import DependencyResult, canonical_names
from fxprune.passes.refit import (
    LayerFit,
    augmented_rows,
    consumers,
    fitted_tensors,
    full_matrix,
    input_space,
    layer_kind,
    output_rows,
    refit,
    refittable,
    statistics,
)
from fxprune.passes.verify import MaskedInterpreter, zero_masks
from fxprune.plan import PruningPlan
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

H_BUDGET_BYTES = 256 * 2**20  # float64 statistics held at once


def downstream(gm: fx.GraphModule, layers: list[tuple[str, nn.Module, np.ndarray]]) -> list[tuple[str, nn.Module, np.ndarray]]:
    """``(name, module, every input column)`` of each other refittable layer, called once, that the graph runs
    on something computed from one of ``layers``' outputs: its input is what the pruned upstream gives."""
    names = {name for name, _, _ in layers}
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    reached: set[fx.Node] = set()
    todo = [n for name in names for n in calls.get(name, ())]
    while todo:
        for user in todo.pop().users:
            if user not in reached:
                reached.add(user)
                todo.append(user)
    out = []
    for name, m in refittable(gm):
        nodes = calls.get(name, [])
        if name not in names and len(nodes) == 1 and nodes[0] in reached:
            width = m.weight.shape[0] if layer_kind(m) == "conv1d" else m.weight.shape[1]
            out.append((name, m, np.arange(width)))
    return out


def reconstruct(gm: fx.GraphModule, deps: DependencyResult, plan: PruningPlan, batches: Sequence[tuple[Any, ...]],
                runner: nn.Module | None = None, example: tuple[Any, ...] | None = None) -> tuple[LayerFit, ...]:
    """Refit every consumer of removed channels of ``gm`` (a private copy), and every layer after one, on
    ``batches``, in place.

    Args:
        gm: the traced private copy the plan was made on; its weights are changed.
        deps: its dependencies; plan: the channels kept.
        batches: calibration batches (tuples of model inputs).
        runner: what runs the batches (default ``gm``): the eager private copy whose modules ``gm`` shares,
            when the graph is specialised to the example's shapes.
        example: the example inputs the graph was traced on: batches that differ from them only in a batch
            size that is a multiple of theirs are cut into example-shaped pieces, which the graph runs.

    Raises:
        ArgumentError: no calibration batches.
    """
    if not batches:
        raise ArgumentError("reconstruct=True refits the kept weights on data: pass calibration=<batches>")
    layers = consumers(gm, deps, plan)
    pieces = batches if runner is None else _example_shaped(batches, example)
    if pieces is not None:  # on the unpruned inputs (_at_once) the layers after them have nothing to make up
        layers = layers + downstream(gm, layers)
    fits = _sequential(gm, deps, plan, layers, pieces) if pieces is not None else _at_once(runner, layers, batches)
    for f in fits:
        log.info("fxprune: reconstructed %s (%d of %d inputs%s): calibration error %.3g -> %.3g", f.name, f.kept,
                 f.inputs, ", bias compensated" if f.bias else "", f.error_before, f.error_after)
    no_bias = [f.name for f in fits if not f.bias and f.error_after < f.error_before]  # refitted, no bias
    if no_bias:  # what was skipped: the removed inputs' mean has nowhere to go (Llama: config mlp_bias=False)
        log.info("fxprune: bias compensation skipped on %d of %d refitted layers that have no bias (%s)",
                 len(no_bias), len(fits), ", ".join(no_bias[:4]) + (", ..." if len(no_bias) > 4 else ""))
    return tuple(fits)


def _example_shaped(batches: Sequence[tuple[Any, ...]], example: tuple[Any, ...] | None) -> list[tuple[Any, ...]] | None:
    """``batches`` cut along dim 0 into pieces of the example's shapes; None when some batch cannot be."""
    if not example or not all(isinstance(x, torch.Tensor) and x.dim() for x in example):
        return None
    n = example[0].shape[0]
    out: list[tuple[Any, ...]] = []
    for batch in batches:
        if len(batch) != len(example) or not all(isinstance(t, torch.Tensor) for t in batch):
            return None
        if any(t.shape[1:] != x.shape[1:] or t.shape[0] % n or t.shape[0] // n != batch[0].shape[0] // n
               for t, x in zip(batch, example, strict=True)):
            return None
        out += [tuple(t[i:i + n] for t in batch) for i in range(0, batch[0].shape[0], n)]
    return out


def _sequential(gm: fx.GraphModule, deps: DependencyResult, plan: PruningPlan,
                layers: list[tuple[str, nn.Module, np.ndarray]], batches: Sequence[tuple[Any, ...]]) -> list[LayerFit]:
    """Layers in graph order, each fitted on what the pruned, refitted upstream gives it: the graph runs with
    the removed channels of every layer already fitted set to zero (``MaskedInterpreter``), while the
    layer's own removed inputs are still there (they are what its refit makes up for). The target is what
    the unpruned model computed (the graph run again with the fitted layers' original weights): the layer's
    output, or, where the layer's output is added straight to a residual stream, that sum less what the pruned
    stream brings to it; so a refit also makes up for what the layers before it lost, and errors do not pile
    up. Layers that do not feed one another (q, k and v; gate and up) are fitted from the same runs (a wave),
    and each run stops at the last node the wave needs."""
    sol = deps.solution
    dropped = plan.dropped_mask(sol.n_classes)
    committed = np.zeros_like(dropped)
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    calls = {str(n.target): n for n in modules}  # a module called twice: its last call (then the plain target)
    order = {str(n.target): i for i, n in enumerate(modules)}
    names = canonical_names(gm)
    originals: dict[nn.Module, list[torch.Tensor]] = {}
    fits: list[LayerFit] = []
    placed = []
    for name, m, cols in sorted(layers, key=lambda layer: order.get(layer[0], len(order))):
        if name not in order:  # traced through, not called as a module: no hook sees its input
            log.info("fxprune: %s is not one call in the graph: not reconstructed", name)
            continue
        placed.append(_Layer(name, m, cols, calls[name], _residual(gm, calls[name])))
    for wave in _waves(placed):
        zero = zero_masks(deps, dropped & committed)
        stats = _paired_statistics(gm, wave, zero, originals, batches)
        for layer in wave:
            h, xty, target = stats[layer.name]
            if h is not None:
                originals[layer.module] = [t.detach().clone() for t in fitted_tensors(layer.module)]
                fits.append(refit(layer.name, layer.module, layer.cols, h, xty, target))
        for layer in wave:
            committed[sol.space_labels(input_space(layer.module, names))] = True
    return fits


@dataclass(frozen=True)
class _Layer:
    """One layer to refit: its call in the graph and, when it ends a residual branch, ``(add, stream, norm)``."""

    name: str
    module: nn.Module
    cols: np.ndarray
    node: fx.Node
    residual: tuple[fx.Node, fx.Node, nn.Module | None] | None

    @property
    def needed(self) -> list[fx.Node]:
        """The nodes whose values its statistics read."""
        return [self.node] + ([self.residual[0], self.residual[1]] if self.residual is not None else [])


def _waves(layers: list[_Layer]) -> list[list[_Layer]]:
    """``layers`` (in graph order) cut into runs of layers none of which reads another's output, or the sum
    another's residual branch ends in: each wave can be fitted from one pass over the batches."""
    waves: list[list[_Layer]] = []
    outputs: set[fx.Node] = set()  # what the current wave's layers make
    for layer in layers:
        if not waves or _reads(layer, outputs):
            waves.append([])
            outputs = set()
        waves[-1].append(layer)
        outputs |= set(layer.needed)
    return waves


def _reads(layer: _Layer, nodes: set[fx.Node]) -> bool:
    """Whether anything ``layer`` needs is computed from one of ``nodes``."""
    todo, seen = list(layer.needed), set()
    while todo:
        n = todo.pop()
        if n in nodes:
            return True
        for up in n.all_input_nodes:
            if up not in seen:
                seen.add(up)
                todo.append(up)
    return False


_ADDS = (operator.add, operator.iadd, torch.add)


def _residual(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, nn.Module | None] | None:
    """``(add, stream, norm)`` when the layer's output goes only into ``add = stream + output`` (a residual
    branch's last layer: ``o_proj``, ``down_proj``), or only through an eval-mode BatchNorm ``norm`` into it (a
    ResNet block's last conv); else None."""
    norm = None
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        bn = gm.get_submodule(str(users[0].target))
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training and bn.running_var is not None:
            node, norm, users = users[0], bn, list(users[0].users)
    add = users[0] if len(users) == 1 else None
    if add is None or add.kwargs or len(add.args) != 2 or not (
            (add.op == "call_function" and add.target in _ADDS) or (add.op == "call_method" and add.target == "add")):
        return None
    a, b = add.args
    stream = b if a is node else a if b is node else None
    return (add, stream, norm) if isinstance(stream, fx.Node) and stream is not node else None


def _before_norm(norm: nn.Module | None, y: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """The input an eval-mode BatchNorm needs to give ``y`` (channels whose scale is zero: ``plain``)."""
    if norm is None:
        return y
    shape = (1, -1) + (1,) * (y.dim() - 2)
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.double() * scale + (norm.bias.detach().double() if norm.bias is not None else 0)
    ok = scale.abs() > 1e-12
    x = (y.double() - shift.view(shape)) / torch.where(ok, scale, 1.0).view(shape)
    return torch.where(ok.view(shape), x, plain.double())


class _Capture(MaskedInterpreter):
    """A ``MaskedInterpreter`` that keeps the values of the nodes ``keep`` names and stops after ``last``."""

    def __init__(self, gm: fx.GraphModule, zero: dict[str, list[tuple[int, torch.Tensor]]], keep: set[str],
                 last: fx.Node) -> None:
        super().__init__(gm, zero)
        self.keep, self.kept, self.last = keep, {}, last

    def run_until(self, *args: Any) -> None:
        """Run the graph's nodes in order up to ``last`` (what comes after it is not needed)."""
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        for node in self.graph.nodes:
            out = self.run_node(node)
            if node.name in self.keep:
                self.kept[node.name] = out
            if node is self.last:
                return
            self.env[node] = out
            for gone in self.user_to_last_uses.get(node, []):
                del self.env[gone]


@contextmanager
def _original_weights(originals: dict[nn.Module, list[torch.Tensor]]) -> Iterator[None]:
    """The refitted layers' weights as they were before their refit, for the block (their storage swapped in
    and back: nothing is copied)."""
    now = {m: [t.data for t in fitted_tensors(m)] for m in originals}
    try:
        for m, old in originals.items():
            for t, o in zip(fitted_tensors(m), old, strict=True):
                t.data = o
        yield
    finally:
        for m, current in now.items():
            for t, c in zip(fitted_tensors(m), current, strict=True):
                t.data = c


Stats = tuple[torch.Tensor | None, torch.Tensor | None, float]


class _Sums:
    """One layer's running ``X^T X``, ``X^T Y`` and ``||Y||^2`` (``None``: it never ran, or shapes did not line up)."""

    def __init__(self, layer: _Layer) -> None:
        self.layer, self.full = layer, full_matrix(layer.module)
        self.seen: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []
        self.h: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.unpruned: torch.Tensor | None = None  # its output in the unpruned run of the batch at hand
        self.target, self.failed = 0.0, False

    def add(self, y: torch.Tensor, x: torch.Tensor | None, unpruned_out: torch.Tensor | None,
            plain: _Capture, masked: _Capture) -> None:
        if x is None or x.shape[0] != y.shape[0]:
            self.failed = True
            return
        if self.layer.residual is not None:
            add, stream, norm = self.layer.residual
            total, part = plain.kept.get(add.name), masked.kept.get(stream.name)
            if isinstance(total, torch.Tensor) and isinstance(part, torch.Tensor) and total.shape == part.shape \
                    and (norm is None or isinstance(unpruned_out, torch.Tensor) and unpruned_out.shape == total.shape):
                residual_y = output_rows(self.layer.module, _before_norm(norm, total - part, unpruned_out))
                if residual_y.shape == y.shape:
                    y = residual_y
        self.h = x.t() @ x if self.h is None else self.h + x.t() @ x
        self.xty = x.t() @ y if self.xty is None else self.xty + x.t() @ y
        self.target += float(y.square().sum())

    def result(self) -> Stats:
        return (None, None, 0.0) if self.failed or self.h is None else (self.h, self.xty, self.target)


def _paired_statistics(gm: fx.GraphModule, wave: list[_Layer], zero: dict[str, list[tuple[int, torch.Tensor]]],
                       originals: dict[nn.Module, list[torch.Tensor]], batches: Sequence[tuple[Any, ...]],
                       ) -> dict[str, Stats]:
    """``(X^T X, X^T Y, ||Y||^2)`` of each layer of ``wave`` over ``batches``: ``X`` its input from the pruned
    upstream (masked run; a ones column when it has a bias), ``Y`` the target from the unpruned model (plain run,
    original weights): ``X_o [W b]^T``, or with a residual ``(add, stream, norm)`` the unpruned sum less the
    pruned stream (through the norm's inverse). ``(None, None, 0)`` for a layer that never ran or whose shapes
    do not line up."""
    sums = [_Sums(layer) for layer in wave]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max((n for s in sums for n in s.layer.needed), key=position.__getitem__)
    adds = {s.layer.residual[0].name for s in sums if s.layer.residual is not None}
    streams = {s.layer.residual[1].name for s in sums if s.layer.residual is not None}
    hooks = []
    for s in sums:
        hooks.append(s.layer.module.register_forward_pre_hook(
            lambda mod, args, s=s: s.seen.append(augmented_rows(mod, args[0]))))
        hooks.append(s.layer.module.register_forward_hook(lambda mod, args, out, s=s: s.out.append(out)))
    try:
        with torch.no_grad(), kept_buffers(gm):
            for inputs in batches:
                with _original_weights(originals):
                    plain = _Capture(gm, {}, adds, last)
                    plain.run_until(*inputs)
                ys = []
                for s in sums:
                    ys.append(torch.cat(s.seen) @ s.full.t() if s.seen else None)
                    s.unpruned = s.out[0] if len(s.out) == 1 else None
                    s.seen.clear()
                    s.out.clear()
                masked = _Capture(gm, zero, streams, last)
                masked.run_until(*inputs)
                for s, y in zip(sums, ys, strict=True):
                    x = torch.cat(s.seen) if s.seen else None
                    s.seen.clear()
                    s.out.clear()
                    if y is None:
                        s.failed = True
                    else:
                        s.add(y, x, s.unpruned, plain, masked)
                    s.unpruned = None
    finally:
        for hook in hooks:
            hook.remove()
    return {s.layer.name: s.result() for s in sums}


def _at_once(model: nn.Module, layers: list[tuple[str, nn.Module, np.ndarray]],
             batches: Sequence[tuple[Any, ...]]) -> list[LayerFit]:
    """Every layer fitted on the unpruned model's inputs to it, a few layers per run of the batches (the
    eager copy runs them: the graph is specialised to the example's shapes)."""
    fits: list[LayerFit] = []

    def run() -> None:
        with torch.no_grad(), kept_buffers(model):
            for inputs in batches:
                model(*inputs)

    chunk: list[tuple[str, nn.Module, np.ndarray]] = []
    size = 0
    for i, layer in enumerate(layers):
        chunk.append(layer)
        m = layer[1]
        size += 8 * ((m.weight.shape[0] if layer_kind(m) == "conv1d" else m.weight[0].numel()) + 1) ** 2
        if size >= H_BUDGET_BYTES or i == len(layers) - 1:
            stats = statistics(chunk, run)
            for name, m, cols in chunk:
                if name in stats:
                    fits.append(refit(name, m, cols, stats.pop(name)))
            chunk, size = [], 0
    return fits
