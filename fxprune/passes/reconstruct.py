"""Least-squares reconstruction of the consumers of removed channels (``reconstruct=True``).

Once the plan says which channels go, every linear consumer of removed channels (``nn.Linear``, Hugging Face's
``Conv1D`` and ungrouped ``nn.Conv2d``, whose input is read as its unfolded patches) gets its kept input
columns refitted so that, on the calibration batches, it
computes what it computed with every column (the channel-pruning reconstruction of He et al. 2017 and
ThiNet; FLAP's bias compensation where the layer has a bias):

    [W' b'] = [W b] H[:, K] (H[K, K] + damp I)^-1,   H = sum over samples of [x; 1] [x; 1]^T

with ``K`` the kept inputs (and the ones row when there is a bias), ``damp`` 0.1% of the mean of ``H[K, K]``'s
diagonal (GPTQ damps by 1%; on the benchmark's Llama 0.1% fits better, docs/llm.md). The refit changes the private copy's weights before the rewrite, so the mask oracle
proves ``pruned == refitted original with the removed channels zeroed``: exactness is kept.

Sequential, as SlimGPT and GPTQ are: layers are fitted in graph order, each on what the already pruned and
refitted upstream gives it (the graph runs with the removed channels of the layers fitted so far zeroed),
toward what it computed in the unpruned model (``X`` pruned inputs, ``X_o`` unpruned ones: ``H[:, K]`` above
becomes ``X_o^T X[:, K]``), so each refit also makes up for what the layers before it lost.
A graph specialised to the example's shapes cannot run batches of other shapes: then every layer is fitted
on the unpruned model's inputs (the eager copy runs them), a few layers per run so that the float64 ``H``
matrices held at once stay under ``H_BUDGET_BYTES``. A layer whose refit would not lower its calibration
error is left as it was. Across the parts of a model pruned part by part, each part is fitted on what the
parts pruned before it give it (``partial.compile_parts``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.depgraph import param_value
from fxprune.errors import ArgumentError
from fxprune.passes.dependency import DependencyResult, canonical_names
from fxprune.passes.rewrite import kept_indices
from fxprune.passes.verify import MaskedInterpreter, zero_masks
from fxprune.plan import PruningPlan
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

H_BUDGET_BYTES = 256 * 2**20  # float64 statistics held at once
DAMP = 0.001


@dataclass(frozen=True)
class LayerFit:
    """What reconstruction did to one layer.

    Attributes:
        name: the layer's module name.
        kept: input channels kept, of ``inputs``.
        inputs: its input channels before pruning.
        error_before: relative calibration error of its output with the kept columns as they were
            (``||(W - W_K) X||^2 / ||W X||^2``).
        error_after: the same after the refit (equal to ``error_before`` when the refit was not applied).
        bias: whether its bias absorbed the removed inputs' mean (a layer without a bias cannot).
    """

    name: str
    kept: int
    inputs: int
    error_before: float
    error_after: float
    bias: bool


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor):
        return "conv1d"  # Hugging Face GPT-2: y = x @ W + b, W of shape (in, out)
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and _padding(m) is not None:
        return "conv"  # a linear map of its unfolded input: (C * kh * kw) columns
    return None


def _padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as two ints (None: a 'same' padding that is not symmetric)."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return tuple(m.padding)  # type: ignore[return-value]


def _columns(m: nn.Module, cols: np.ndarray) -> np.ndarray:
    """The weight columns (of ``_weight``) that read input channels ``cols``: a conv reads each channel in
    ``kh * kw`` columns."""
    if _kind(m) != "conv":
        return cols
    area = m.kernel_size[0] * m.kernel_size[1]
    return (cols[:, None] * area + np.arange(area)).reshape(-1)


def consumers(gm: nn.Module, deps: DependencyResult, plan: PruningPlan) -> list[tuple[str, nn.Module, np.ndarray]]:
    """``(name, module, kept input columns)`` of every refittable layer that loses input channels.

    A weight shared by several modules (a tie) is left alone: one refit cannot serve two inputs."""
    kept = kept_indices(deps, plan)
    names = canonical_names(gm)
    uses: dict[int, int] = {}
    for m in gm.modules():
        for t in m._parameters.values():
            if t is not None:
                uses[id(t)] = uses.get(id(t), 0) + 1
    out = []
    for name, m in gm.named_modules():
        kind = _kind(m)
        if kind is None or uses.get(id(m.weight), 0) != 1 or id(m.weight) not in names:
            continue
        space = _input_space(m, names)
        cols = kept.get(space)
        if cols is not None and 0 < len(cols) < m.weight.shape[space[1]]:
            out.append((name, m, cols))
    return out


def _input_space(m: nn.Module, names: dict[int, str]) -> tuple[str, int]:
    """The channel space of the layer's input: its weight's input dim (dim 0 of a Conv1D's, else dim 1)."""
    return param_value(names[id(m.weight)]), 0 if _kind(m) == "conv1d" else 1


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (samples, columns) in float64 (a conv's: every patch it reads, unfolded)."""
    if _kind(m) == "conv":
        patches = F.unfold(x.detach().double(), m.kernel_size, m.dilation, _padding(m), m.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.detach().reshape(-1, x.shape[-1]).double()


def _weight(m: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) in float64."""
    w = m.weight.detach().double()
    kind = _kind(m)
    return w.t() if kind == "conv1d" else w.reshape(w.shape[0], -1) if kind == "conv" else w


def _set_weight(m: nn.Module, w: torch.Tensor) -> None:
    kind = _kind(m)
    value = w.t() if kind == "conv1d" else w.reshape(m.weight.shape) if kind == "conv" else w
    with torch.no_grad():
        m.weight.copy_(value.to(m.weight.dtype))


def _statistics(layers: Sequence[tuple[str, nn.Module, np.ndarray]], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """``H = sum [x; 1][x; 1]^T`` of each layer's input over the batches ``run`` feeds (ones row: with a bias)."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m, _ in layers:
        def record(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = _rows(mod, args[0])
            if getattr(mod, "bias", None) is not None:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            h = x.t() @ x
            stats[name] = stats[name] + h if name in stats else h

        hooks.append(m.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


def _refit(name: str, m: nn.Module, cols: np.ndarray, h: torch.Tensor, cross: torch.Tensor | None = None,
           target: float | None = None) -> LayerFit:
    """Refit ``m``'s kept columns: ``h`` is ``X^T X`` of the inputs it gets now (upstream pruned); ``cross`` is
    ``X_o^T X`` with ``X_o`` what the unpruned model gives it, ``target`` is ``||X_o [W b]^T||^2`` (both absent:
    the target is the layer's full output on its current inputs)."""
    w = _weight(m)
    n_in, columns = w.shape[1], _columns(m, cols)
    bias = getattr(m, "bias", None) is not None
    full = torch.cat([w, m.bias.detach().double()[:, None]], 1) if bias else w  # type: ignore[union-attr]
    keep = torch.as_tensor(np.append(columns, n_in) if bias else columns, dtype=torch.long)
    channels = n_in if _kind(m) != "conv" else m.in_channels
    c = h if cross is None else cross
    hk = h[keep][:, keep]
    damp = DAMP * float(hk.diagonal().mean()) + 1e-12
    fitted = torch.linalg.solve(hk + damp * torch.eye(len(keep), dtype=h.dtype), (full @ c[:, keep]).t()).t()
    total = float(torch.einsum("ij,jk,ik->", full, h, full)) if target is None else target
    reach = full @ c  # (out, in): full X_o^T X

    def error(kept_part: torch.Tensor) -> float:
        """``||X_o full^T - X E^T||^2 / ||X_o full^T||^2`` with ``E`` the kept part embedded at full width."""
        embedded = torch.zeros_like(full)
        embedded[:, keep] = kept_part
        quad = float(torch.einsum("ij,jk,ik->", embedded, h, embedded)) - 2 * float((reach * embedded).sum())
        return max(0.0, total + quad) / total if total > 0 else 0.0

    before, after = error(full[:, keep]), error(fitted)
    if not after < before or not torch.isfinite(fitted).all():
        return LayerFit(name, len(cols), channels, before, before, False)
    new_w = w.clone()
    new_w[:, torch.as_tensor(columns, dtype=torch.long)] = fitted[:, : len(columns)]
    _set_weight(m, new_w)
    if bias:
        with torch.no_grad():
            m.bias.copy_(fitted[:, -1].to(m.bias.dtype))  # type: ignore[union-attr]
    return LayerFit(name, len(cols), channels, before, after, bias)


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
    the layer computed in the unpruned model (the graph run again with the fitted layers' original weights),
    so a refit also makes up for what the layers before it lost, and errors do not pile up."""
    sol = deps.solution
    dropped = plan.dropped_mask(sol.n_classes)
    committed = np.zeros_like(dropped)
    order = {str(n.target): i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    names = canonical_names(gm)
    originals: dict[nn.Module, list[torch.Tensor]] = {}
    fits: list[LayerFit] = []
    for name, m, cols in sorted(layers, key=lambda layer: order.get(layer[0], len(order))):
        if name not in order:  # traced through, not called as a module: no hook sees its input
            log.info("fxprune: %s is not one call in the graph: not reconstructed", name)
            continue
        zero = zero_masks(deps, dropped & committed)
        h, cross, target = _paired_statistics(gm, m, zero, originals, batches)
        if h is not None:
            originals[m] = [t.detach().clone() for t in _tensors(m)]
            fits.append(_refit(name, m, cols, h, cross, target))
        committed[sol.space_labels(_input_space(m, names))] = True
    return fits


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [m.weight] + ([m.bias] if getattr(m, "bias", None) is not None else [])


@contextmanager
def _original_weights(originals: dict[nn.Module, list[torch.Tensor]]) -> Iterator[None]:
    """The refitted layers' weights as they were before their refit, for the block."""
    saved = {m: [t.detach().clone() for t in _tensors(m)] for m in originals}
    try:
        with torch.no_grad():
            for m, old in originals.items():
                for t, o in zip(_tensors(m), old, strict=True):
                    t.copy_(o)
        yield
    finally:
        with torch.no_grad():
            for m, now in saved.items():
                for t, o in zip(_tensors(m), now, strict=True):
                    t.copy_(o)


def _paired_statistics(gm: fx.GraphModule, m: nn.Module, zero: dict[str, list[tuple[int, torch.Tensor]]],
                       originals: dict[nn.Module, list[torch.Tensor]], batches: Sequence[tuple[Any, ...]],
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """``(X^T X, X_o^T X, ||X_o [W b]^T||^2)`` of ``m``'s input over ``batches``: ``X`` what the pruned upstream
    gives it (masked run), ``X_o`` what the unpruned model gives it (plain run, original weights); a ones
    column when it has a bias. ``(None, None, 0)`` when the layer never ran."""
    seen: list[torch.Tensor] = []

    def record(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = _rows(mod, args[0])
        if getattr(mod, "bias", None) is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        seen.append(x)

    full = torch.cat([_weight(m)] + ([m.bias.detach().double()[:, None]] if getattr(m, "bias", None) is not None
                                      else []), 1)
    h = cross = None
    target = 0.0
    hook = m.register_forward_pre_hook(record)
    try:
        with torch.no_grad(), kept_buffers(gm):
            for inputs in batches:
                with _original_weights(originals):
                    gm(*inputs)
                if not seen:
                    return None, None, 0.0
                xo = torch.cat(seen)
                seen.clear()
                MaskedInterpreter(gm, zero).run(*inputs)
                x = torch.cat(seen) if seen else None
                seen.clear()
                if x is None or x.shape != xo.shape:
                    return None, None, 0.0
                h = x.t() @ x if h is None else h + x.t() @ x
                cross = xo.t() @ x if cross is None else cross + xo.t() @ x
                target += float((xo @ full.t()).square().sum())
    finally:
        hook.remove()
    return h, cross, target


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
        size += 8 * ((m.weight.shape[0] if _kind(m) == "conv1d" else m.weight[0].numel()) + 1) ** 2
        if size >= H_BUDGET_BYTES or i == len(layers) - 1:
            stats = _statistics(chunk, run)
            for name, m, cols in chunk:
                if name in stats:
                    fits.append(_refit(name, m, cols, stats.pop(name)))
            chunk, size = [], 0
    return fits
