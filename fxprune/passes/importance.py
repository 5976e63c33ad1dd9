"""Importance of channel classes: the L2 norm of every parameter slice a class touches, summed over members."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx

from fxprune.passes.dependency import DependencyResult

Importance = Callable[[fx.GraphModule, DependencyResult], np.ndarray]


def _param_tensor(gm: fx.GraphModule, qualname: str) -> torch.Tensor:
    owner, _, attr = qualname.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def norm_importance(gm: fx.GraphModule, deps: DependencyResult, p: int = 2) -> np.ndarray:
    """Score every class by the Lp norm of each member parameter slice, summed over members.

    A class that touches several indices of one parameter dim (a flatten block, a grouped conv) gets the
    norm of all of them together. Buffers (running statistics) do not count.

    Returns:
        float64 scores, one per class label.
    """
    sol = deps.solution
    scores = np.zeros(sol.n_classes, dtype=np.float64)
    buffers = {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    for value, qual in deps.params.items():
        if qual in buffers:
            continue
        dims = [d for d in range(_param_tensor(gm, qual).dim()) if (value, d) in sol.offsets]
        if not dims:
            continue
        t = _param_tensor(gm, qual).detach().float()
        powered = t * t if p == 2 else t.abs().pow(p)  # once per tensor, summed per dim below
        for d in dims:
            space = (value, d)
            other = [k for k in range(t.dim()) if k != d]
            per_index = (powered.sum(dim=other) if other else powered).double().numpy()
            labels = sol.space_labels(space)
            uniq, inv = np.unique(labels, return_inverse=True)
            sums = np.bincount(inv, weights=per_index, minlength=len(uniq))
            scores[uniq] += sums ** (1.0 / p)
    return scores


def l2_importance(gm: fx.GraphModule, deps: DependencyResult) -> np.ndarray:
    """L2 importance (the default)."""
    return norm_importance(gm, deps, 2)


def l1_importance(gm: fx.GraphModule, deps: DependencyResult) -> np.ndarray:
    """L1 importance."""
    return norm_importance(gm, deps, 1)


def random_importance(seed: int = 0) -> Importance:
    """Seeded random scores (a baseline, and random plans for the oracle tests)."""

    def score(gm: fx.GraphModule, deps: DependencyResult) -> np.ndarray:
        return np.random.default_rng(seed).random(deps.solution.n_classes)

    return score


IMPORTANCE: dict[str, Importance] = {"l2": l2_importance, "l1": l1_importance, "random": random_importance(0)}
