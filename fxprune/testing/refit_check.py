"""An independent check of ``reconstruct=True``: each refitted layer's weights against a least-squares fit
computed here from the eager models alone.

For a layer fitted toward its own unpruned output (``LayerFit.target == "own"``), its input in the *pruned*
model and its output in the *original* model are recorded with hooks on the calibration batches; every row of
the pruned layer's ``[W b]`` must then be (as good as) the damped least-squares fit of some row of the original
output on that input. Compared by the objective, not the weights: ill-conditioned inputs leave the weights
free along directions the fit does not see. A wrong input (the unpruned one, a norm not over the kept
channels) or a wrong target (a value an in-place op had changed) gives a clearly worse objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from fxprune.passes.refit import DAMP, augmented_rows, full_matrix, output_rows
from fxprune.state import kept_buffers

TOLERANCE = 1e-3  # the pruned row's objective may exceed the best by this fraction of its target's energy


def refit_gaps(model: nn.Module, pruned: nn.Module, fits: Sequence[Any],
               batches: Sequence[tuple[Any, ...]]) -> dict[str, float]:
    """For each applied "own"-target refit in ``fits``: the worst pruned row's excess objective, relative."""
    names = [f.name for f in fits if f.target == "own" and f.error_after < f.error_before]
    mods = [(n, model.get_submodule(n), pruned.get_submodule(n)) for n in names if _has(model, n) and _has(pruned, n)]
    xs: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in mods}
    ys: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in mods}
    hooks = []
    for n, orig, mine in mods:
        hooks.append(mine.register_forward_pre_hook(lambda m, a, n=n: xs[n].append(augmented_rows(m, a[0]))))
        hooks.append(orig.register_forward_hook(lambda m, a, out, n=n: ys[n].append(output_rows(m, out))))
    try:
        with torch.no_grad(), kept_buffers(model, pruned):
            for batch in batches:
                model(*batch)
                pruned(*batch)
    finally:
        for h in hooks:
            h.remove()
    gaps: dict[str, float] = {}
    for n, _, mine in mods:
        if len(xs[n]) != len(ys[n]) or not xs[n]:
            continue  # called more or less than once per batch: not a layer the refit fitted
        x, y = torch.cat(xs[n]), torch.cat(ys[n])
        if x.shape[0] != y.shape[0]:
            continue
        gaps[n] = _gap(x, y, full_matrix(mine))
    return gaps


def _gap(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """max over ``w``'s rows of min over ``y``'s columns j of (f_j(row) - min f_j) / ||y_j||^2, with
    f_j(v) = ||y_j - x v||^2 + d ||v||^2 and d the refit's damping."""
    h = x.t() @ x
    d = DAMP * float(h.diagonal().mean()) + 1e-12
    hd = h + d * torch.eye(len(h), dtype=h.dtype)
    xty = x.t() @ y
    yy = y.square().sum(0)
    best = yy - (xty * torch.linalg.solve(hd, xty)).sum(0)  # min f_j
    mine = yy[None, :] - 2 * (w @ xty) + ((w @ hd) * w).sum(1)[:, None]  # f_j(row i), rows x columns
    rel = (mine - best[None, :]) / yy.clamp_min(1e-12)[None, :]
    return float(rel.min(1).values.max())


def _has(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
    except AttributeError:
        return False
    return True
