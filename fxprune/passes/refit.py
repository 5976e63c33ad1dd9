"""The least-squares refit of one layer's kept input columns (``reconstruct=True``; ``passes/reconstruct.py``
decides the order and gathers the statistics).

    [W' b'] = Y^T X[:, K] (X[:, K]^T X[:, K] + damp I)^-1

``X`` the layer's input rows (a conv's unfolded patches; a ones column when it has a bias), ``K`` the kept
columns, ``Y`` the target rows, ``damp`` 0.1% of the mean of the kept block's diagonal (GPTQ damps by 1%; on
the benchmark's Llama 0.1% fits better, docs/llm.md). A refit that would not lower the layer's calibration
error is not applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.depgraph import param_value
from fxprune.passes.dependency import DependencyResult, canonical_names
from fxprune.passes.rewrite import kept_indices
from fxprune.plan import PruningPlan

DAMP = 0.001


@dataclass(frozen=True)
class LayerFit:
    """What reconstruction did to one layer.

    Attributes:
        name: the layer's module name.
        kept: input channels kept, of ``inputs``.
        inputs: its input channels before pruning.
        error_before: relative calibration error against its target with the kept columns as they were
            (``||Y - X W_K^T||^2 / ||Y||^2``; ``Y`` what the unpruned model computed, ``reconstruct.py``).
        error_after: the same after the refit (equal to ``error_before`` when the refit was not applied).
        bias: whether its bias absorbed the removed inputs' mean (a layer without a bias cannot).
        target: what it was fitted toward: "own" (its unpruned output, on the pruned model's input), "residual"
            (the unpruned sum its residual branch ends in, less the pruned stream) or "unpruned inputs" (its
            unpruned output, on the unpruned model's input: batches the graph could not run in order).
    """

    name: str
    kept: int
    inputs: int
    error_before: float
    error_after: float
    bias: bool
    target: str = "own"


def layer_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor):
        return "conv1d"  # Hugging Face GPT-2: y = x @ W + b, W of shape (in, out)
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and conv_padding(m) is not None:
        return "conv"  # a linear map of its unfolded input: (C * kh * kw) columns
    return None


def conv_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as two ints (None: a 'same' padding that is not symmetric)."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return tuple(m.padding)  # type: ignore[return-value]


def weight_columns(m: nn.Module, cols: np.ndarray) -> np.ndarray:
    """The weight columns (of ``_weight``) that read input channels ``cols``: a conv reads each channel in
    ``kh * kw`` columns."""
    if layer_kind(m) != "conv":
        return cols
    area = m.kernel_size[0] * m.kernel_size[1]
    return (cols[:, None] * area + np.arange(area)).reshape(-1)


def consumers(gm: nn.Module, deps: DependencyResult, plan: PruningPlan) -> list[tuple[str, nn.Module, np.ndarray]]:
    """``(name, module, kept input columns)`` of every refittable layer that loses input channels.

    A weight shared by several modules (a tie) is left alone: one refit cannot serve two inputs."""
    kept = kept_indices(deps, plan)
    names = canonical_names(gm)
    out = []
    for name, m in refittable(gm):
        if id(m.weight) not in names:
            continue
        space = input_space(m, names)
        cols = kept.get(space)
        if cols is not None and 0 < len(cols) < m.weight.shape[space[1]]:
            out.append((name, m, cols))
    return out


def refittable(gm: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer a refit can change: a linear map of its input whose weight no other
    module shares (a tie: one refit cannot serve two inputs)."""
    uses: dict[int, int] = {}
    for m in gm.modules():
        for t in m._parameters.values():
            if t is not None:
                uses[id(t)] = uses.get(id(t), 0) + 1
    return [(name, m) for name, m in gm.named_modules()
            if layer_kind(m) is not None and uses.get(id(m.weight), 0) == 1]


def input_space(m: nn.Module, names: dict[int, str]) -> tuple[str, int]:
    """The channel space of the layer's input: its weight's input dim (dim 0 of a Conv1D's, else dim 1)."""
    return param_value(names[id(m.weight)]), 0 if layer_kind(m) == "conv1d" else 1


def input_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (samples, columns) in float64 (a conv's: every patch it reads, unfolded)."""
    if layer_kind(m) == "conv":
        patches = F.unfold(x.detach().double(), m.kernel_size, m.dilation, conv_padding(m), m.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.detach().reshape(-1, x.shape[-1]).double()


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in) in float64."""
    w = m.weight.detach().double()
    kind = layer_kind(m)
    return w.t() if kind == "conv1d" else w.reshape(w.shape[0], -1) if kind == "conv" else w


def set_weight_matrix(m: nn.Module, w: torch.Tensor) -> None:
    kind = layer_kind(m)
    value = w.t() if kind == "conv1d" else w.reshape(m.weight.shape) if kind == "conv" else w
    with torch.no_grad():
        m.weight.copy_(value.to(m.weight.dtype))


def augmented_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``input_rows`` with a ones column when the layer has a bias (the bias is then fitted as one more column)."""
    rows = input_rows(m, x)
    if getattr(m, "bias", None) is None:
        return rows
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)


def full_matrix(m: nn.Module) -> torch.Tensor:
    """``[W b]`` in float64: the weight matrix with the bias as its last column when there is one."""
    w = weight_matrix(m)
    b = getattr(m, "bias", None)
    return w if b is None else torch.cat([w, b.detach().double()[:, None]], 1)


def statistics(layers: Sequence[tuple[str, nn.Module, np.ndarray]], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """``H = sum [x; 1][x; 1]^T`` of each layer's input over the batches ``run`` feeds (ones row: with a bias)."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m, _ in layers:
        def record(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = augmented_rows(mod, args[0])
            h = x.t() @ x
            stats[name] = stats[name] + h if name in stats else h

        hooks.append(m.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return stats


def refit(name: str, m: nn.Module, cols: np.ndarray, h: torch.Tensor, xty: torch.Tensor | None = None,
           target: float | None = None) -> LayerFit:
    """Refit ``m``'s kept columns to ``min ||Y - X[:, K] W_K^T||``: ``h`` is ``X^T X`` of the inputs it gets now
    (upstream pruned), ``xty`` is ``X^T Y`` and ``target`` is ``||Y||^2`` (both absent: ``Y`` is the layer's
    full output on its current inputs, ``X [W b]^T``)."""
    w = weight_matrix(m)
    n_in, columns = w.shape[1], weight_columns(m, cols)
    bias = getattr(m, "bias", None) is not None
    full = full_matrix(m)
    keep = torch.as_tensor(np.append(columns, n_in) if bias else columns, dtype=torch.long)
    channels = n_in if layer_kind(m) != "conv" else m.in_channels
    if xty is None:
        xty = h @ full.t()
        target = float(torch.einsum("ij,jk,ik->", full, h, full))
    hk = h[keep][:, keep]
    damp = DAMP * float(hk.diagonal().mean()) + 1e-12
    fitted = torch.linalg.solve(hk + damp * torch.eye(len(keep), dtype=h.dtype), xty[keep]).t()
    total = float(target or 0.0)
    reach = xty.t()  # (out, in): Y^T X

    def error(kept_part: torch.Tensor) -> float:
        """``||Y - X E^T||^2 / ||Y||^2`` with ``E`` the kept part embedded at full width."""
        embedded = torch.zeros_like(full)
        embedded[:, keep] = kept_part
        quad = float(torch.einsum("ij,jk,ik->", embedded, h, embedded)) - 2 * float((reach * embedded).sum())
        return max(0.0, total + quad) / total if total > 0 else 0.0

    before, after = error(full[:, keep]), error(fitted)
    if not after < before or not torch.isfinite(fitted).all():
        return LayerFit(name, len(cols), channels, before, before, False)
    new_w = w.clone()
    new_w[:, torch.as_tensor(columns, dtype=torch.long)] = fitted[:, : len(columns)]
    set_weight_matrix(m, new_w)
    if bias:
        with torch.no_grad():
            m.bias.copy_(fitted[:, -1].to(m.bias.dtype))  # type: ignore[union-attr]
    return LayerFit(name, len(cols), channels, before, after, bias)


def output_rows(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output as (samples, out) in float64, rows in the order ``input_rows`` gives its inputs."""
    if layer_kind(m) == "conv":
        return y.detach().double().flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.detach().double().reshape(-1, y.shape[-1])


def fitted_tensors(m: nn.Module) -> list[torch.Tensor]:
    """The tensors a refit writes: the weight, and the bias when there is one."""
    return [m.weight] + ([m.bias] if getattr(m, "bias", None) is not None else [])
