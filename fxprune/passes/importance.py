"""Importance criteria: each scores the channels of one coupled group from every parameter slice they touch.

A criterion is a callable ``criterion(group: GroupTensors) -> np.ndarray`` of ``group.size`` scores (higher =
more important). ``GroupTensors`` hands it, per member parameter dim, the rows of that parameter (the dim
moved first and the rest flattened) and the group-local channel each row belongs to, so a criterion never
needs to know about flatten blocks, grouped convs or tied weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxprune.depgraph import space_label
from fxprune.errors import ArgumentError, FxPruneError
from fxprune.passes.base import module_tensors
from fxprune.passes.dependency import DependencyResult, canonical_names
from fxprune.plan import ChannelGroup
from fxprune.state import kept_buffers
from fxprune.validate import check_scores


@dataclass(frozen=True)
class MemberSlice:
    """One parameter dim of a group.

    Attributes:
        name: readable label, e.g. ``layer1.0.conv1.weight[0]``.
        param: qualified parameter name.
        dim: the dim of the parameter that the group's channels index.
        module_type: type name of the module owning the parameter (e.g. ``BatchNorm2d``).
        stored: the whole parameter, detached, in its own dtype (``tensor`` is it in float32).
        index: the rows of ``dim`` that belong to this group, or None for all of them.
        position: group-local channel position of every row (int array of ``n_rows``).
        grad: the gradient as ``[n_rows, rest]`` when a criterion asked for gradients, else None.
        act: for the input dim of a layer, the L2 norm of that layer's input per row (channel) over the
            calibration batches, when a criterion asked for activations; else None.
    """

    name: str
    param: str
    dim: int
    module_type: str
    stored: torch.Tensor
    index: torch.Tensor | None
    position: np.ndarray
    grad: torch.Tensor | None
    act: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        """The whole parameter in float32 (a copy made on each use for half-precision weights, so a model's
        weights are never all held in float32 at once while its groups are scored)."""
        return self.stored.float()

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """Float32 ``[n_rows, rest]``: the parameter with ``dim`` first, rest flattened (copied on first use)."""
        t = self.tensor
        base = t.movedim(self.dim, 0).reshape(t.shape[self.dim], -1)
        return base if self.index is None else base[self.index]

    def row_sums(self, p: float = 2.0) -> torch.Tensor:
        """Per-row sum of ``|w|**p`` over the other dims, without a transposed copy.

        The parameter is viewed as ``[outer, rows, inner]``: the norm over the contiguous ``inner`` dim reads
        the weight once and allocates only ``[outer, rows]``, which is then summed over ``outer``. Reducing
        over non-contiguous dims directly (a conv's input channels) is 4x slower, and materialising ``w * w``
        cost resnet50 0.1 s of allocation and page faults.
        """
        t = self.tensor
        rows = t.shape[self.dim]
        outer = math.prod(t.shape[: self.dim])
        w = t.reshape(outer, rows, -1)
        if w.shape[2] > 1:
            out = torch.linalg.vector_norm(w, ord=p, dim=2).pow(p)
        else:
            out = w.squeeze(2).abs().pow(p) if p != 2 else w.squeeze(2).square()
        out = out.sum(0) if outer > 1 else out.squeeze(0)
        return out if self.index is None else out[self.index]


@dataclass(frozen=True)
class GroupTensors:
    """A coupled group together with its parameter slices (see module docstring)."""

    group: ChannelGroup
    members: tuple[MemberSlice, ...]

    @property
    def size(self) -> int:
        """Number of channels (classes) in the group."""
        return self.group.size

    def per_channel(self, values: torch.Tensor, member: MemberSlice) -> np.ndarray:
        """Sum a per-row quantity of ``member`` into one value per channel of the group."""
        return np.bincount(member.position, weights=values.detach().double().cpu().numpy(), minlength=self.size)


Criterion = Callable[[GroupTensors], np.ndarray]


def group_tensors(
    gm: fx.GraphModule,
    deps: DependencyResult,
    groups: Iterable[ChannelGroup],
    grads: dict[str, torch.Tensor] | None = None,
    acts: dict[str, torch.Tensor] | None = None,
) -> Iterator[GroupTensors]:
    """Yield the parameter slices of every group (parameters only; running statistics are skipped)."""
    sol = deps.solution
    tensors = module_tensors(gm)
    params = {m.name: m.tensor for m in tensors if m.is_parameter}
    owners = {m.name: type(m.module).__name__ for m in tensors}
    position = np.full(sol.n_classes, -1, dtype=np.int64)
    for classes in sol.groups:
        position[classes] = np.arange(len(classes))
    per_group: dict[int, list[MemberSlice]] = {}
    for value, qual in deps.params.items():
        t = params.get(qual)
        if t is None:
            continue
        base = t.detach()  # in its own dtype: ``MemberSlice.tensor`` casts on use
        for d in (d for d in range(t.dim()) if (value, d) in sol.offsets):
            space = (value, d)
            labels = sol.space_labels(space)
            gids = sol.class_group[labels]
            gbase = None
            if grads is not None and qual in grads:
                gbase = grads[qual].movedim(d, 0).reshape(t.shape[d], -1).float()
            abase = acts.get(qual) if acts is not None and d == 1 else None
            if abase is not None and abase.shape != (t.shape[1],):
                abase = None  # a grouped conv: its input channels are not the weight's dim 1
            for g in sol.groups_in(space):
                rows_idx = np.nonzero(gids == g)[0]
                whole = len(rows_idx) == len(labels)  # the common case: no copy
                idx = None if whole else torch.as_tensor(rows_idx)
                grad = None if gbase is None else (gbase if whole else gbase[idx])
                act = None if abase is None else (abase if whole else abase[idx])
                member = MemberSlice(space_label(space), qual, d, owners.get(qual, ""), base, idx,
                                     position[labels[rows_idx]], grad, act)
                per_group.setdefault(g, []).append(member)
    for group in groups:
        yield GroupTensors(group, tuple(per_group.get(group.id, ())))


def norm(p: float = 2.0) -> Criterion:
    """Lp norm of every member slice per channel, summed over members (``l2``: p=2, ``l1``: p=1)."""

    def score(g: GroupTensors) -> np.ndarray:
        out = np.zeros(g.size)
        for m in g.members:
            out += g.per_channel(m.row_sums(p), m) ** (1.0 / p)
        return out

    score.__name__ = f"l{p:g}"
    return score


def random(seed: int = 0) -> Criterion:
    """Seeded random scores (a baseline; also random plans for the oracle)."""

    def score(g: GroupTensors) -> np.ndarray:
        return np.random.default_rng([seed, g.group.id]).random(g.size)

    return score


def bn_scale(g: GroupTensors) -> np.ndarray:
    """|gamma| of the BatchNorm members (network slimming); groups without BatchNorm fall back to L2."""
    bns = [m for m in g.members if m.module_type.startswith("BatchNorm") and m.param.endswith(".weight")]
    if not bns:
        return norm(2.0)(g)
    out = np.zeros(g.size)
    for m in bns:
        out += g.per_channel(m.rows.abs().sum(1), m)
    return out


def lamp(g: GroupTensors) -> np.ndarray:
    """LAMP: squared L2 score divided by the sum of the scores of every channel at least as important."""
    s = norm(2.0)(g) ** 2
    order = np.argsort(s, kind="stable")
    tail = np.cumsum(s[order][::-1])[::-1]  # sum over channels ranked at or above each one
    out = np.empty_like(s)
    out[order] = s[order] / np.maximum(tail, 1e-30)
    return out


class Taylor:
    """First-order Taylor importance |w * dL/dw| from a few user batches.

    ``L`` is always the whole model's loss: a model pruned part by part (an untraceable root) is run whole on
    the batches once, and each part is scored by the gradients of its own parameters
    (``fxprune.importance_taylor``).

    Args:
        batches: an iterable of ``(inputs, target)`` pairs of the whole model; ``inputs`` is a tensor or a
            tuple of tensors.
        loss_fn: ``loss_fn(output, target) -> scalar``; default cross-entropy.
    """

    needs_grad = True

    def __init__(self, batches: Iterable[tuple[Any, Any]], loss_fn: Callable[[Any, Any], torch.Tensor] | None = None):
        self.batches = list(batches)
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        if not self.batches:
            raise ArgumentError("Taylor importance needs at least one (inputs, target) batch")

    def gradients(self, gm: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Accumulate gradients of the loss over the batches on the private copy (eval mode).

        ``gm`` is the traced graph or, for a model pruned part by part, fxprune's private copy of the whole
        model (``fxprune.importance_taylor``): the batches and the loss are always the whole model's.

        Raises:
            ArgumentError: the model, the loss or its backward failed on a batch (naming the exception).
        """
        params = dict(gm.named_parameters())
        saved = {n: p.requires_grad for n, p in params.items()}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        try:
            for p in params.values():
                p.requires_grad_(True)
            for k, (inputs, target) in enumerate(self.batches):
                gm.zero_grad(set_to_none=True)
                with torch.enable_grad():  # a caller's no_grad must not turn the loss into a constant
                    self._backward(gm, inputs, target, k)
                for n, p in params.items():
                    if p.grad is not None:
                        grads[n] += p.grad.detach()
        finally:
            gm.zero_grad(set_to_none=True)
            for n, p in params.items():
                p.requires_grad_(saved[n])
        return grads

    def _backward(self, model: torch.nn.Module, inputs: Any, target: Any, k: int) -> None:
        try:
            loss = self.loss_fn(model(*(inputs if isinstance(inputs, tuple) else (inputs,))), target)
            loss.backward()
        except FxPruneError:
            raise
        except Exception as e:
            raise ArgumentError(f"Taylor importance: batch {k} failed ({type(e).__name__}: {e}); Taylor(batches, "
                                "loss_fn) takes (inputs, target) pairs of the whole model and loss_fn(the whole "
                                "model's output, target) -> a scalar with a gradient") from e

    def __call__(self, g: GroupTensors) -> np.ndarray:
        out = np.zeros(g.size)
        for m in g.members:
            if m.grad is not None:
                out += g.per_channel((m.rows * m.grad).sum(1).abs(), m)
        return out


class Activations:
    """Activation-aware structured importance from calibration batches (Wanda's score, per channel).

    A channel's score is, summed over the layers that read it, ``||W[:, c]||_2 * ||X_c||_2``: the norm of
    the weights that read channel ``c`` times the norm of what arrives on it over the calibration batches
    (``X_c`` the layer's input). A weight that is large but reads an almost silent channel matters little;
    magnitude alone cannot see that. Layers read are ``nn.Linear`` and ungrouped convs; a group that no
    such layer reads is scored by L2.

    Args:
        batches: model inputs, each a tensor or a tuple of positional tensors (no targets needed).
    """

    needs_activations = True

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = [b if isinstance(b, tuple) else (b,) for b in batches]
        if not self.batches:
            raise ArgumentError("activation importance needs at least one calibration batch")

    def activations(
        self, gm: fx.GraphModule, canonical: dict[int, str], runner: torch.nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Per input channel of every Linear and conv weight of ``gm`` (by canonical name), the L2 norm of
        its input over the batches, under ``no_grad``. The batches run through ``runner`` (default ``gm``):
        the eager private copy whose modules ``gm`` shares, when the graph is specialised to the example."""
        sums: dict[str, torch.Tensor] = {}
        handles = []

        def hook(name: str, channel_dim: int) -> Callable[..., None]:
            def record(_mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor) or x.dim() <= channel_dim:
                    return
                sq = x.detach().double().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1).square().sum(1)
                sums[name] = sums[name] + sq if name in sums else sq

            return record

        for mod in gm.modules():
            name = canonical.get(id(getattr(mod, "weight", None)))
            if name is None:
                continue
            if isinstance(mod, torch.nn.Linear):
                handles.append(mod.register_forward_pre_hook(hook(name, -1)))
            elif isinstance(mod, torch.nn.modules.conv._ConvNd) and not mod.transposed and mod.groups == 1:
                handles.append(mod.register_forward_pre_hook(hook(name, -len(mod.kernel_size) - 1)))
        try:
            with torch.no_grad():
                for inputs in self.batches:
                    (gm if runner is None else runner)(*inputs)
        finally:
            for h in handles:
                h.remove()
        return {n: s.sqrt().float() for n, s in sums.items()}

    def __call__(self, g: GroupTensors) -> np.ndarray:
        members = [m for m in g.members if m.act is not None]
        if not members:
            return norm(2.0)(g)
        out = np.zeros(g.size)
        for m in members:
            out += g.per_channel(m.row_sums(2.0).sqrt() * m.act, m)  # type: ignore[operator]
        return out


CRITERIA: dict[str, Criterion] = {
    "l2": norm(2.0),
    "l1": norm(1.0),
    "random": random(0),
    "bn_scale": bn_scale,
    "lamp": lamp,
}


def resolve(importance: str | Criterion, calibration: Iterable[Any] | None = None) -> Criterion:
    """Return the criterion for a name or a callable (``"activation"`` is built on ``calibration``)."""
    if callable(importance):
        return importance
    if importance == "activation":
        if calibration is None:
            raise ArgumentError("activation importance needs data: pass calibration=<batches of model inputs> "
                                "(or importance=fxprune.Activations(batches))")
        return Activations(calibration)
    if importance == "taylor":
        raise ArgumentError("taylor importance needs data: pass importance=fxprune.Taylor(batches, loss_fn)")
    if importance not in CRITERIA:
        raise ArgumentError(f"unknown importance {importance!r}; choose one of "
                            f"{sorted(CRITERIA) + ['activation', 'taylor']} "
                            "or pass a callable")
    return CRITERIA[importance]


def random_importance(seed: int = 0) -> Criterion:
    """Seeded random scores (kept for the tests' and fuzzer's vocabulary)."""
    return random(seed)


def score_groups(
    gm: fx.GraphModule, deps: DependencyResult, groups: tuple[ChannelGroup, ...], criterion: Criterion,
    eager: torch.nn.Module | None = None,
) -> list[np.ndarray]:
    """Score every group with ``criterion``; unprunable groups get zeros without calling it.

    ``eager``: the private copy the graph was traced from, run instead of the graph by data-driven criteria
    (gradients, activations). Given when the graph was traced with the example's values: it may hold the
    example's shapes as constants and fail on, or silently mis-handle, batches of other shapes, while the
    eager copy runs any batch the model takes. The graph's modules and parameters are the copy's own
    objects, so hooks and gradients land on the same tensors.
    """
    runner = gm if eager is None else eager
    grads = None
    acts = None
    with kept_buffers(runner, gm):  # the batches' runs leave no state behind (a counter, an average)
        if getattr(criterion, "needs_grad", False):
            grads = criterion.gradients(runner)  # type: ignore[attr-defined]
            if eager is not None:  # by the graph's names (a lowered module's parameters keep their names)
                grads = {n: grads[n] for n, _ in gm.named_parameters() if n in grads}
        if getattr(criterion, "needs_activations", False):
            acts = criterion.activations(gm, canonical_names(gm), runner)  # type: ignore[attr-defined]
    out: list[np.ndarray] = []
    for gt in group_tensors(gm, deps, groups, grads, acts):
        if not gt.group.prunable:
            out.append(np.zeros(gt.size))
            continue
        try:
            raw = criterion(gt)
        except FxPruneError:
            raise
        except Exception as e:
            if any(criterion is c for c in CRITERIA.values()):
                raise  # a built-in criterion failing is fxprune's bug, not a bad argument
            name = getattr(criterion, "__name__", type(criterion).__name__)
            first = gt.group.producers[0] if gt.group.producers else "-"
            raise ArgumentError(f"importance {name} failed on group {gt.group.id} ({gt.size} channels, first "
                                f"producer {first}): {type(e).__name__}: {e}; fix the criterion or use a "
                                "built-in one") from e
        out.append(check_scores(raw, gt.group.id, gt.size, criterion))  # finite, one per channel
    return out
