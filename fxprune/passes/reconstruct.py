"""Least-squares reconstruction of the consumers of removed channels (``reconstruct=True``).

Once the plan says which channels go, every linear consumer of removed channels (``nn.Linear``, Hugging Face's
``Conv1D`` and ungrouped ``nn.Conv2d``, whose input is read as its unfolded patches) gets its kept input
columns refitted by least squares on the calibration batches (``passes/refit.py``: the channel-pruning
reconstruction of He et al. 2017 and ThiNet; FLAP's bias compensation where the layer has a bias). The refit
changes the private copy's weights before the rewrite, so the mask oracle proves ``pruned == refitted
original with the removed channels zeroed``: exactness is kept.

Sequential, as SlimGPT and GPTQ are: layers are fitted in graph order, each on what the already pruned and
refitted upstream gives it (the graph runs with the removed channels of the layers fitted so far zeroed),
toward what the unpruned model computed: the layer's own output, or, for the last layer of a residual
branch (its output added straight to the stream, or through an eval-mode BatchNorm), the unpruned sum less
what the pruned stream brings; so each refit also makes up for what the layers before it lost.
A graph specialised to the example's shapes cannot run batches of other shapes: then every layer is fitted
on the unpruned model's inputs (the eager copy runs them), a few layers per run so that the float64
statistics held at once stay under ``H_BUDGET_BYTES``. Across the parts of a model pruned part by part,
each part is fitted on what the parts pruned before it give it (``partial.compile_parts``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    statistics,
)
from fxprune.passes.verify import MaskedInterpreter, zero_masks
from fxprune.plan import PruningPlan
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

H_BUDGET_BYTES = 256 * 2**20  # float64 statistics held at once


def reconstruct(gm: fx.GraphModule, deps: DependencyResult, plan: PruningPlan, batches: Sequence[tuple[Any, ...]],
                runner: nn.Module | None = None, example: tuple[Any, ...] | None = None) -> tuple[LayerFit, ...]:
    """Refit every consumer of removed channels of ``gm`` (a private copy) on ``batches``, in place.

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
    up."""
    sol = deps.solution
    dropped = plan.dropped_mask(sol.n_classes)
    committed = np.zeros_like(dropped)
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    calls = {str(n.target): n for n in modules}  # a module called twice: its last call (then the plain target)
    order = {str(n.target): i for i, n in enumerate(modules)}
    names = canonical_names(gm)
    originals: dict[nn.Module, list[torch.Tensor]] = {}
    fits: list[LayerFit] = []
    for name, m, cols in sorted(layers, key=lambda layer: order.get(layer[0], len(order))):
        if name not in order:  # traced through, not called as a module: no hook sees its input
            log.info("fxprune: %s is not one call in the graph: not reconstructed", name)
            continue
        zero = zero_masks(deps, dropped & committed)
        h, xty, target = _paired_statistics(gm, m, _residual(gm, calls[name]), zero, originals, batches)
        if h is not None:
            originals[m] = [t.detach().clone() for t in fitted_tensors(m)]
            fits.append(refit(name, m, cols, h, xty, target))
        committed[sol.space_labels(input_space(m, names))] = True
    return fits


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
    """A ``MaskedInterpreter`` that keeps the values of the nodes ``keep`` names."""

    def __init__(self, gm: fx.GraphModule, zero: dict[str, list[tuple[int, torch.Tensor]]], keep: set[str]) -> None:
        super().__init__(gm, zero)
        self.keep, self.kept = keep, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.kept[n.name] = out
        return out


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


def _paired_statistics(gm: fx.GraphModule, m: nn.Module, residual: tuple[fx.Node, fx.Node, nn.Module | None] | None,
                       zero: dict[str, list[tuple[int, torch.Tensor]]],
                       originals: dict[nn.Module, list[torch.Tensor]], batches: Sequence[tuple[Any, ...]],
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """``(X^T X, X^T Y, ||Y||^2)`` of ``m`` over ``batches``: ``X`` its input from the pruned upstream (masked
    run; a ones column when it has a bias), ``Y`` the target from the unpruned model (plain run, original
    weights): ``X_o [W b]^T``, or with a ``residual`` ``(add, stream, norm)`` the unpruned sum less the pruned
    stream (through the norm's inverse). ``(None, None, 0)`` when the layer never ran or shapes do not line up."""
    layer_out: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    full = full_matrix(m)
    add, stream, norm = residual if residual is not None else (None, None, None)
    h = xty = None
    target = 0.0
    hook = m.register_forward_pre_hook(lambda mod, args: seen.append(augmented_rows(mod, args[0])))
    out_hook = m.register_forward_hook(lambda mod, args, out: layer_out.append(out))
    try:
        with torch.no_grad(), kept_buffers(gm):
            for inputs in batches:
                with _original_weights(originals):
                    plain = _Capture(gm, {}, {add.name} if add is not None else set())
                    plain.run(*inputs)
                if not seen:
                    return None, None, 0.0
                y = torch.cat(seen) @ full.t()
                seen.clear()
                unpruned_out = layer_out[0] if len(layer_out) == 1 else None
                layer_out.clear()
                masked = _Capture(gm, zero, {stream.name} if stream is not None else set())
                masked.run(*inputs)
                layer_out.clear()
                x = torch.cat(seen) if seen else None
                seen.clear()
                if x is None or x.shape[0] != y.shape[0]:
                    return None, None, 0.0
                if add is not None and stream is not None:
                    total, part = plain.kept.get(add.name), masked.kept.get(stream.name)
                    if isinstance(total, torch.Tensor) and isinstance(part, torch.Tensor) and total.shape == part.shape \
                            and (norm is None or isinstance(unpruned_out, torch.Tensor) and unpruned_out.shape == total.shape):
                        residual_y = output_rows(m, _before_norm(norm, total - part, unpruned_out))
                        if residual_y.shape == y.shape:
                            y = residual_y
                h = x.t() @ x if h is None else h + x.t() @ x
                xty = x.t() @ y if xty is None else xty + x.t() @ y
                target += float(y.square().sum())
    finally:
        hook.remove()
        out_hook.remove()
    return h, xty, target


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
