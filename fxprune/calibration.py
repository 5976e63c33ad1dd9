"""Calibration batches, checked once against the example inputs before any work.

A batch is a tensor or a tuple of positional tensors, like ``example_inputs``. The checks catch what would
otherwise surface deep inside a run as a raw error, or silently score the wrong thing: a bare tensor (its
rows would be taken as batches), a generator (consumed by the first reader), another number of inputs, a
floating-point batch where the model takes integer ids, or another number of dimensions. Floating batches
of another floating dtype (float64 data for a float32 model) are cast to the example's dtype. Sizes are
not compared: batch size and sequence length may differ from the example's; a size the model cannot take
is reported by the run that reads the batches, naming the batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fxprune.errors import ArgumentError

log = logging.getLogger(__name__)


def _shape(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, torch.Tensor) else type(t).__name__


def checked_batches(batches: Any, example: tuple[Any, ...] | None, what: str = "calibration") -> tuple[Any, ...]:
    """``batches`` as a tuple of tuples of inputs, each checked against ``example`` (the example inputs).

    Raises:
        ArgumentError: naming the batch and input that does not fit, and what to pass instead.
    """
    if isinstance(batches, torch.Tensor):
        raise ArgumentError(f"{what} takes a list of batches, got one tensor of shape {tuple(batches.shape)}; "
                            f"pass [x] for a single batch")
    if isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise ArgumentError(f"{what} takes a list of batches (each a tensor or a tuple of tensors), "
                            f"got {type(batches).__name__}")
    out = []
    for k, batch in enumerate(batches):  # a generator is read once, here
        items = batch if isinstance(batch, tuple) else (batch,)
        if example is not None and len(items) != len(example):
            raise ArgumentError(f"{what} batch {k} has {len(items)} input(s), the example inputs have "
                                f"{len(example)}; give each batch as a tuple like example_inputs")
        fixed = []
        for i, t in enumerate(items):
            ref = example[i] if example is not None else None
            if not isinstance(t, torch.Tensor) or not isinstance(ref, torch.Tensor):
                fixed.append(t)
                continue
            if t.dim() != ref.dim():
                raise ArgumentError(f"{what} batch {k} input {i} has shape {_shape(t)}, the example input has "
                                    f"{_shape(ref)}: a batch must have as many dimensions as the example")
            if ref.is_floating_point() != t.is_floating_point() or ref.is_complex() != t.is_complex():
                raise ArgumentError(f"{what} batch {k} input {i} is {_shape(t)} where the example input is "
                                    f"{_shape(ref)}: give it the example's kind of dtype (token ids are integers)")
            if t.is_floating_point() and t.dtype != ref.dtype:
                log.info("fxprune: %s batch %d input %d cast from %s to %s", what, k, i, t.dtype, ref.dtype)
                t = t.to(ref.dtype)
            fixed.append(t)
        out.append(tuple(fixed) if isinstance(batch, tuple) else fixed[0])
    if not out:
        raise ArgumentError(f"{what} is empty: give at least one batch")
    return tuple(out)
