"""One way to walk a model's output structure, shared by the oracle, the write-back and the tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


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


def restore_output_class(gm: fx.GraphModule, cls: type | None) -> bool:
    """Make ``gm`` return ``cls`` again when the model returns a dict subclass (a Hugging Face ``ModelOutput``)
    and fx traced it as a plain dict: callers read ``out.logits`` and ``out.to_tuple()``.

    Returns:
        Whether the graph's output was changed.
    """
    if cls is None or cls is dict or not issubclass(cls, dict):
        return False
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return False
    with gm.graph.inserting_before(out):
        made = gm.graph.call_function(cls, (), dict(value))
    made.meta["is_wrapped"] = True  # a reloaded GraphModule re-traces its code: the class must stay one call
    out.args = (made,)
    gm.recompile()
    return True
