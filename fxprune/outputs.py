"""One way to walk a model's output structure, shared by the oracle, the write-back and the tests."""

from __future__ import annotations

from typing import Any

import torch


def tensors_of(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, in order: tuples, lists, dict values, and objects with
    ``to_tuple()`` (Hugging Face ModelOutput); anything else (None, ints) contributes nothing."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_of(v)]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    if hasattr(out, "to_tuple"):
        return tensors_of(out.to_tuple())
    return []
