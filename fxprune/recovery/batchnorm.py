"""Re-estimate BatchNorm running statistics after a cut: the cheapest recovery step, with no gradient.

Removing channels changes the sums every following layer computes, so the BatchNorm running mean and
variance recorded on the unpruned model no longer describe the pruned model's activations. Re-estimating
them on a few training batches often restores much of the accuracy before any fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: int | None = None,
    device: str | torch.device | None = None,
) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``loader``, in place.

    Only the running mean, variance and batch counter of BatchNorm layers change; weights do not. The
    statistics are a plain average over the batches seen (``momentum=None`` while recalibrating). Other
    layers run in eval mode (dropout off), and every module's training flag is restored afterwards.

    Args:
        model: the model to recalibrate (e.g. the ``GraphModule`` from ``fxprune.prune``).
        loader: batches of ``(inputs, targets)`` (targets unused) or of bare input tensors.
        batches: use at most this many batches; None uses the whole loader.
        device: where to run; default the model's device. Inputs are moved there.

    Returns:
        The number of BatchNorm layers recalibrated (0 leaves the model untouched).

    Raises:
        ValueError: when ``batches`` is not a positive int or None.
    """
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches must be a positive int or None, got {batches!r}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    flags = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None} for bn in norms]
    ok = False
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        seen = 0
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if batches is not None and i >= batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
                model(*(x.to(device) for x in inputs))
                seen += 1
        if seen == 0:
            raise ValueError("loader produced no batches")
        ok = True
    finally:
        if not ok:  # an error half-way must not leave reset statistics behind
            for bn, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(bn, name).copy_(value)
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        for module, flag in flags:
            module.training = flag
    log.info("recalibrated %d BatchNorm layers on %d batches", len(norms), seen)
    return len(norms)
