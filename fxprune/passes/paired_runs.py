"""The paired runs that gather one wave's least-squares statistics for ``reconstruct.py``.

A wave is a run of layers none of which feeds another (q, k and v; gate and up): each batch runs the graph
twice, up to the last node the wave needs: once as the unpruned model (original weights, the unpruned model's
inputs) for the targets, once masked as the pruned model (the removed channels of the layers fitted so far
zeroed) for the layers' inputs. The last layer of a residual branch is aimed at the unpruned sum less the
pruned stream (``residual_of``), through an eval BatchNorm's inverse where there is one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.passes.refit import augmented_rows, fitted_tensors, full_matrix, output_rows
from fxprune.passes.verify import MaskedInterpreter
from fxprune.rules.registry import has_trait
from fxprune.state import kept_buffers


@dataclass(frozen=True)
class Layer:
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


def waves(layers: list[Layer]) -> list[list[Layer]]:
    """``layers`` (in graph order) cut into runs of layers none of which reads another's output, or the sum
    another's residual branch ends in: each wave can be fitted from one pass over the batches."""
    waves: list[list[Layer]] = []
    outputs: set[fx.Node] = set()  # what the current wave's layers make
    for layer in layers:
        if not waves or _reads(layer, outputs):
            waves.append([])
            outputs = set()
        waves[-1].append(layer)
        outputs |= set(layer.needed)
    return waves


def _reads(layer: Layer, nodes: set[fx.Node]) -> bool:
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


def residual_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, nn.Module | None] | None:
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
    if add is None or add.kwargs or len(add.args) != 2 or not has_trait(add, "residual_add"):
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
                self.kept[node.name] = _copy(out)  # an in-place op further on (ReLU(inplace=True)) must not reach it
            if node is self.last:
                return
            self.env[node] = out
            for gone in self.user_to_last_uses.get(node, []):
                del self.env[gone]


def _state(gm: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's buffers."""
    return {name: b.detach().clone() for name, b in gm.named_buffers()}


def _load(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The buffers set back to ``state`` (in place: the graph holds them)."""
    for name, b in gm.named_buffers():
        b.copy_(state[name])


def _copy(value: Any) -> Any:
    """A tensor copied (what later in-place ops would write into); anything else as it is."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@contextmanager
def original_weights(originals: dict[nn.Module, list[torch.Tensor]]) -> Iterator[None]:
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


Stats = tuple[torch.Tensor | None, torch.Tensor | None, float, str]  # X^T X, X^T Y, ||Y||^2, the target's kind


class _Sums:
    """One layer's running ``X^T X``, ``X^T Y`` and ``||Y||^2`` (``None``: it never ran, or shapes did not line up)."""

    def __init__(self, layer: Layer) -> None:
        self.layer, self.full = layer, full_matrix(layer.module)
        self.seen: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []
        self.h: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.unpruned: torch.Tensor | None = None  # its output in the unpruned run of the batch at hand
        self.target, self.failed, self.residual = 0.0, False, False

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
                    y, self.residual = residual_y, True
        self.h = x.t() @ x if self.h is None else self.h + x.t() @ x
        self.xty = x.t() @ y if self.xty is None else self.xty + x.t() @ y
        self.target += float(y.square().sum())

    def result(self) -> Stats:
        kind = "residual" if self.residual else "own"
        return (None, None, 0.0, kind) if self.failed or self.h is None else (self.h, self.xty, self.target, kind)


def paired_statistics(gm: fx.GraphModule, wave: list[Layer], zero: dict[str, list[tuple[int, torch.Tensor]]],
                       originals: dict[nn.Module, list[torch.Tensor]], batches: Sequence[tuple[Any, ...]],
                       sources: Sequence[tuple[Any, ...]]) -> dict[str, Stats]:
    """``(X^T X, X^T Y, ||Y||^2)`` of each layer of ``wave`` over ``batches``: ``X`` its input from the pruned
    upstream (masked run; a ones column when it has a bias), ``Y`` the target from the unpruned model (plain run
    of ``sources``, the batches' unpruned counterparts, with the original weights): ``X_o [W b]^T``, or with a residual ``(add, stream, norm)`` the unpruned sum less the
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
        hooks.append(s.layer.module.register_forward_hook(lambda mod, args, out, s=s: s.out.append(_copy(out))))
    try:
        with torch.no_grad(), kept_buffers(gm):
            states = {"plain": _state(gm)}
            for inputs, unpruned in zip(batches, sources, strict=True):
                states["masked"] = _state(gm)  # the unpruned and the pruned model each keep their own state (a
                _load(gm, states["plain"])  # forward that counts its calls), advanced once per batch, as theirs
                with original_weights(originals):
                    plain = _Capture(gm, {}, adds, last)
                    plain.run_until(*unpruned)
                states["plain"] = _state(gm)
                _load(gm, states["masked"])
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
