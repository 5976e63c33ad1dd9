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
refitted upstream gives it (the graph runs with every removed channel zeroed: its input is the pruned
model's, norms over pruned channels and layers no refit changes included),
toward what the unpruned model computed: the layer's own output, or, for the last layer of a residual
branch (its output added straight to the stream, or through an eval-mode BatchNorm), the unpruned sum less
what the pruned stream brings; so each refit also makes up for what the layers before it lost.
A graph specialised to the example's shapes cannot run batches of other shapes: then every consumer is fitted
on the unpruned model's inputs (the eager copy runs them; the layers after them are left, since on those
inputs a refit changes nothing), a few layers per run so that the float64 statistics held at once stay under
``H_BUDGET_BYTES``. Across the parts of a model pruned part by part
(``partial.compile_parts``) or streamed layer by layer (``streaming.py``), each part is fitted on what the parts
pruned before it give it, toward what the unpruned model computed there (``targets``: the unpruned model's
inputs to the part, batch for batch), so a layer also makes up for what the layers before it lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ArgumentError
from fxprune.passes.dependency import DependencyResult, canonical_names
from fxprune.passes.paired_runs import Layer, paired_statistics, residual_of, waves
from fxprune.passes.refit import (
    LayerFit,
    consumers,
    fitted_tensors,
    input_space,
    layer_kind,
    refit,
    refittable,
    statistics,
)
from fxprune.passes.verify import zero_masks
from fxprune.plan import PruningPlan
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

H_BUDGET_BYTES = 256 * 2**20  # float64 statistics held at once


def downstream(gm: fx.GraphModule, deps: DependencyResult,
               layers: list[tuple[str, nn.Module, np.ndarray]]) -> list[tuple[str, nn.Module, np.ndarray]]:
    """``(name, module, every input column)`` of each other refittable layer, called once, that the graph runs
    on something computed from one of ``layers``' outputs: its input is what the pruned upstream gives. Only
    layers whose input channels the dependency analysis tracks (the refit masks by them)."""
    names = {name for name, _, _ in layers}
    params = canonical_names(gm)
    tracked = deps.solution.offsets
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
        if name not in names and len(nodes) == 1 and nodes[0] in reached and id(m.weight) in params \
                and input_space(m, params) in tracked:
            width = m.weight.shape[0] if layer_kind(m) == "conv1d" else m.weight.shape[1]
            out.append((name, m, np.arange(width)))
    return out


def reconstruct(gm: fx.GraphModule, deps: DependencyResult, plan: PruningPlan, batches: Sequence[tuple[Any, ...]],
                runner: nn.Module | None = None, example: tuple[Any, ...] | None = None,
                targets: Sequence[tuple[Any, ...]] | None = None) -> tuple[LayerFit, ...]:
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
        targets: batch for batch, what the unpruned model fed this graph (a part of a model pruned part by
            part, or streamed: ``batches`` are what the pruned parts before it give): the targets are computed
            on these, so the refit also makes up for what the parts before it lost. Default: ``batches``.

    Raises:
        ArgumentError: no calibration batches.
    """
    if not batches:
        raise ArgumentError("reconstruct=True refits the kept weights on data: pass calibration=<batches>")
    layers = consumers(gm, deps, plan)
    pieces = batches if runner is None else example_shaped(batches, example)
    if pieces is not None:
        sources = _targets(pieces, targets, runner, example)
        fits = _sequential(gm, deps, plan, layers + downstream(gm, deps, layers), pieces, sources)
    else:  # on the unpruned inputs the layers after the consumers have nothing to make up
        log.warning("fxprune: reconstruct: the calibration batches are not shaped like the example inputs (or a "
                    "multiple of their batch size), so every layer is refitted on the unpruned model's inputs, "
                    "not in order on the pruned ones; pass example_inputs shaped like one calibration batch for "
                    "the sequential refit")
        fits = _at_once(runner, layers, batches)
    for f in fits:
        log.info("fxprune: reconstructed %s (%d of %d inputs%s): calibration error %.3g -> %.3g", f.name, f.kept,
                 f.inputs, ", bias compensated" if f.bias else "", f.error_before, f.error_after)
    no_bias = [f.name for f in fits if not f.bias and f.error_after < f.error_before]  # refitted, no bias
    if no_bias:  # what was skipped: the removed inputs' mean has nowhere to go (Llama: config mlp_bias=False)
        log.info("fxprune: bias compensation skipped on %d of %d refitted layers that have no bias (%s)",
                 len(no_bias), len(fits), ", ".join(no_bias[:4]) + (", ..." if len(no_bias) > 4 else ""))
    return tuple(fits)


def _targets(pieces: Sequence[tuple[Any, ...]] | None, targets: Sequence[tuple[Any, ...]] | None,
             runner: nn.Module | None, example: tuple[Any, ...] | None) -> Sequence[tuple[Any, ...]]:
    """What the unpruned runs are fed, piece for piece: ``targets`` cut as the batches were, when they line up
    (the same number, tensors of the same shapes); else the pieces themselves."""
    own = pieces or ()
    if targets is None or pieces is None:
        return own
    cut = targets if runner is None else example_shaped(targets, example)
    if cut is None or len(cut) != len(own) or any(
            len(t) != len(p) or any(isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or
                                    (isinstance(a, torch.Tensor) and a.shape != b.shape) for a, b in zip(t, p, strict=True))
            for t, p in zip(cut, own, strict=True)):
        log.info("fxprune: the unpruned model's inputs to this part do not line up with its calibration batches: "
                 "its refit targets what it computes on the pruned inputs")
        return own
    return cut


def example_shaped(batches: Sequence[tuple[Any, ...]], example: tuple[Any, ...] | None) -> list[tuple[Any, ...]] | None:
    """``batches`` cut along dim 0 into pieces of the example's shapes; None when some batch cannot be.

    A batch of the example's shapes is one piece; one whose tensors are each ``k`` times the example's along
    dim 0 is ``k`` pieces, where a tensor of one row in both (a broadcast mask, rotary tables) goes into each."""
    if not example or not all(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] for x in example):
        return None
    out: list[tuple[Any, ...]] = []
    for batch in batches:
        if len(batch) != len(example) or not all(isinstance(t, torch.Tensor) and t.dim() for t in batch):
            return None
        if any(t.shape[1:] != x.shape[1:] or t.shape[0] % x.shape[0] for t, x in zip(batch, example, strict=True)):
            return None
        counts = {t.shape[0] // x.shape[0] for t, x in zip(batch, example, strict=True) if t.shape[0] != 1 or x.shape[0] != 1}
        if len(counts) > 1:
            return None
        k = counts.pop() if counts else 1
        out += [tuple(t if t.shape[0] == x.shape[0] == 1 else t[i * x.shape[0]:(i + 1) * x.shape[0]]
                      for t, x in zip(batch, example, strict=True)) for i in range(k)]
    return out


def _sequential(gm: fx.GraphModule, deps: DependencyResult, plan: PruningPlan,
                layers: list[tuple[str, nn.Module, np.ndarray]], batches: Sequence[tuple[Any, ...]],
                sources: Sequence[tuple[Any, ...]]) -> list[LayerFit]:
    """Layers in graph order, each fitted on what the pruned, refitted upstream gives it: the graph runs with
    every removed channel set to zero, norms over them normalising over the kept ones (``MaskedInterpreter``),
    and the layers fitted so far refitted: its input is the pruned model's, whatever consumed the removed
    channels on the way (a grouped conv, a layer no refit can change). The refit reads only the kept columns;
    what the removed ones carried is in the target. The target is what
    the unpruned model computed (the graph run again with the fitted layers' original weights): the layer's
    output, or, where the layer's output is added straight to a residual stream, that sum less what the pruned
    stream brings to it; so a refit also makes up for what the layers before it lost, and errors do not pile
    up. Layers that do not feed one another (q, k and v; gate and up) are fitted from the same runs (a wave),
    and each run stops at the last node the wave needs."""
    zero = zero_masks(deps, plan.dropped_mask(deps.solution.n_classes))  # the pruned model, at full widths
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    calls = {str(n.target): n for n in modules}  # a module called twice: its last call (then the plain target)
    order = {str(n.target): i for i, n in enumerate(modules)}
    originals: dict[nn.Module, list[torch.Tensor]] = {}
    fits: list[LayerFit] = []
    placed = []
    for name, m, cols in sorted(layers, key=lambda layer: order.get(layer[0], len(order))):
        if name not in order:  # traced through, not called as a module: no hook sees its input
            log.info("fxprune: %s is not one call in the graph: not reconstructed", name)
            continue
        placed.append(Layer(name, m, cols, calls[name], residual_of(gm, calls[name])))
    for wave in waves(placed):
        stats = paired_statistics(gm, wave, zero, originals, batches, sources)
        for layer in wave:
            h, xty, target, kind = stats[layer.name]
            if h is not None:
                originals[layer.module] = [t.detach().clone() for t in fitted_tensors(layer.module)]
                fits.append(replace(refit(layer.name, layer.module, layer.cols, h, xty, target), target=kind))
    return fits


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
                    fits.append(replace(refit(name, m, cols, stats.pop(name)), target="unpruned inputs"))
            chunk, size = [], 0
    return fits
