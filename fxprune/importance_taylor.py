"""Gradient-based importance of a model pruned part by part: the gradients come from the whole model's loss.

A part of a model pruned piecewise (``fxprune.partial``) takes other inputs than the model (hidden states, not
token ids) and returns other outputs (no ``logits``), so neither the user's batches nor the user's loss can be
run on the part itself. ``WholeModelGradients.of`` runs the whole model (fxprune's private copy) once on the
user's batches with the user's loss, before any part changes, and ``PartGradients`` scores each part with the
gradients of its own parameters: a part's Taylor score is ``|w * dL/dw|`` with ``L`` the whole model's loss,
exactly what it is when the model is traced whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import FxPruneError

# GroupTensors -> scores, with ``needs_grad`` and ``gradients(module) -> {parameter name: dL/dw}``
GradientCriterion = Callable[[Any], np.ndarray]


def needs_gradients(criterion: Any) -> bool:
    """Whether ``criterion`` scores channels from gradients (``needs_grad``, as ``fxprune.Taylor``)."""
    return bool(getattr(criterion, "needs_grad", False))


class PartGradients:
    """The criterion one part is scored by: ``criterion``'s scores on gradients taken on the whole model.

    Args:
        criterion: the user's gradient criterion (its ``__call__`` scores every group of the part).
        grads: ``dL/dw`` of the part's parameters, under the part's parameter names (aliases included).
        part: the part's name in the model, for messages.
    """

    needs_grad = True

    def __init__(self, criterion: GradientCriterion, grads: dict[str, torch.Tensor], part: str) -> None:
        self.criterion = criterion
        self.grads = grads
        self.part = part
        self.__name__ = getattr(criterion, "__name__", type(criterion).__name__)

    def gradients(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The gradient of every parameter of ``module`` (the part's traced graph), by its name.

        Raises:
            FxPruneError: a parameter has no whole-model gradient of its shape (its scores would be wrong).
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            g = self.grads.get(name)
            if g is None or g.shape != p.shape:
                got = "none" if g is None else f"one of shape {tuple(g.shape)}"
                raise FxPruneError(f"part {self.part}: parameter {name} of shape {tuple(p.shape)} has {got} from "
                                   "the whole model's loss; its gradient scores cannot be computed (the part is "
                                   "left unpruned; pass ignore=[...] for it or use importance='l2')")
            out[name] = g
        return out

    def matching(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The gradients of the parameters of ``module`` that have one of their shape (a part of this part;
        the others were pruned already)."""
        return {n: g for n, p in module.named_parameters() if (g := self.grads.get(n)) is not None
                and g.shape == p.shape}

    def __call__(self, g: Any) -> np.ndarray:
        return self.criterion(g)


@dataclass(frozen=True)
class WholeModelGradients:
    """``dL/dw`` of every parameter of a model, taken once before any of its parts changes.

    Attributes:
        criterion: the user's gradient criterion.
        by_tensor: ``id(parameter) -> (parameter, gradient)``; the parameter is kept so that an id is never
            matched to another tensor that reuses it after a part was replaced.
    """

    criterion: GradientCriterion
    by_tensor: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, root: nn.Module, criterion: Any) -> WholeModelGradients | None:
        """The gradients ``criterion`` takes on ``root`` (fxprune's private copy); None if it needs none.

        A ``PartGradients`` (a part pruned part by part itself) hands on the gradients it was given.
        """
        if not needs_gradients(criterion):
            return None
        if isinstance(criterion, PartGradients):
            named, user = criterion.matching(root), criterion.criterion
        else:
            flags = [(m, m.training) for m in root.modules()]
            root.eval()  # as a traced graph is scored: no dropout, BatchNorm on its running statistics
            try:
                named, user = criterion.gradients(root), criterion
            finally:
                for m, training in flags:
                    m.training = training
        by_tensor: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, p in root.named_parameters(remove_duplicate=False):  # a tied weight under its first name
            if name in named and id(p) not in by_tensor:
                by_tensor[id(p)] = (p, named[name].detach())
        return cls(user, by_tensor)

    def for_part(self, part: nn.Module, name: str) -> PartGradients:
        """The criterion of ``part`` (named ``name`` in the model): the gradients of its own parameters."""
        grads: dict[str, torch.Tensor] = {}
        for qual, p in part.named_parameters(remove_duplicate=False):
            entry = self.by_tensor.get(id(p))
            if entry is not None and entry[0] is p:
                grads[qual] = entry[1]
        return PartGradients(self.criterion, grads, name)
