"""What both depth pruners share (``fxprune/depth.py`` for block lists, ``fxprune/depth_graph.py`` for the
residual units of a traced graph): the loss type, the default language-model loss and the removal count."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fxprune.errors import ArgumentError

Loss = Callable[[Any, tuple[Any, ...]], torch.Tensor]


def next_token_loss(out: Any, batch: tuple[Any, ...]) -> torch.Tensor:
    """Causal language-model loss: the logits at each position against the next token of ``batch[0]``."""
    logits = out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out
    ids = batch[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def removal_count(remove: float, n: int) -> int:
    """How many of ``n`` blocks ``remove`` asks for (a count, or a fraction in (0, 1) rounded down).

    Raises:
        ArgumentError: not a number, or a count that would leave no block.
    """
    if isinstance(remove, bool) or not isinstance(remove, (int, float)):
        raise ArgumentError(f"remove must be a block count or a fraction in (0, 1), got {remove!r}")
    count = int(remove) if isinstance(remove, int) or remove >= 1 else math.floor(remove * n + 1e-9)
    if not 0 <= count < n:
        raise ArgumentError(f"remove={remove!r} asks for {count} of the {n} blocks: keep at least one")
    return count
