"""The private copy every stage works on: fxprune never runs, writes or modifies the caller's model.

``private_copy`` deep-copies the module tree, parameters and buffers included (``fast.copy_module``: a
shortcut for plain ``nn.Module`` subclasses, about 5x faster than ``copy.deepcopy`` on a ResNet-50).
"""

from __future__ import annotations

import torch.nn as nn

from fxprune.errors import ArgumentError, FxPruneError
from fxprune.fast import copy_module


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, parameters and buffers included: fxprune never runs or writes the caller's
    tensors (a forward may update buffers, and ``Embedding(max_norm=...)`` or ``.data.clamp_()`` even write
    parameters)."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.utils import prune as nn_prune

    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise FxPruneError(
            f"parameter {meta[0]} is on the meta device: fxprune needs real weights to score channels; "
            "load or initialise the weights first (to replay a saved plan on a fresh model, use fxprune.apply)"
        )

    for name, mod in model.named_modules():
        if any(isinstance(h, nn_prune.BasePruningMethod) for h in mod._forward_pre_hooks.values()):
            raise FxPruneError(
                f"module {name or type(model).__name__} carries torch.nn.utils.prune masks; structured pruning "
                "needs real weights: call fxprune.sparsity.make_permanent(model) first"
            )
    try:
        return copy_module(model, {}).eval()
    except Exception as e:
        from torch.nn.utils.weight_norm import WeightNorm

        legacy = [n or type(model).__name__ for n, m in model.named_modules()
                  if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())]
        hint = (f"; {legacy[0]} uses the legacy torch.nn.utils.weight_norm, which cannot be deep-copied: use "
                "torch.nn.utils.parametrizations.weight_norm, or torch.nn.utils.remove_weight_norm first") if legacy else ""
        first = str(e).split(".")[0]
        raise FxPruneError(f"cannot copy the model ({first}){hint}; fxprune never prunes the caller's model in place") from e
