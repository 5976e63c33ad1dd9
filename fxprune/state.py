"""Runs fxprune makes of a model it owns leave its buffers as they found them.

A forward may update buffers (a running average, a call counter). fxprune runs its private copy and the
pruned result several times while proving them (the rewrite's shape check, the write-back comparison,
the config sync, calibration); each run would advance that state, so the model handed back would have
been called N times already. ``kept_buffers`` snapshots every buffer of the given modules (buffers are
small next to the parameters, which a forward does not write: modules that do are pinned) and puts the
values, and the tensor objects, back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def kept_buffers(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``modules`` (value and object) when the block exits, even on failure."""
    saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            for name, t in m._buffers.items():
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    saved.append((m, name, t, t.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, t, value in saved:
                if m._buffers.get(name) is not t:  # replaced by an assignment in forward
                    m._buffers[name] = t
                if not torch.equal(t, value):
                    t.copy_(value)
