"""The private copy every stage works on: fxprune never runs, writes or modifies the caller's model.

``private_copy`` deep-copies the module tree, parameters and buffers included, with a fast path for plain
``nn.Module`` subclasses (about 5x faster than ``copy.deepcopy`` on a ResNet-50).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from fxprune.errors import ArgumentError, FxPruneError


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
        return _copy_module(model, {}).eval()
    except Exception as e:
        from torch.nn.utils.weight_norm import WeightNorm

        legacy = [n or type(model).__name__ for n, m in model.named_modules()
                  if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())]
        hint = (f"; {legacy[0]} uses the legacy torch.nn.utils.weight_norm, which cannot be deep-copied: use "
                "torch.nn.utils.parametrizations.weight_norm, or torch.nn.utils.remove_weight_norm first") if legacy else ""
        first = str(e).split(".")[0]
        raise FxPruneError(f"cannot copy the model ({first}){hint}; fxprune never prunes the caller's model in place") from e


_IMMUTABLE = (int, float, bool, str, type(None), torch.dtype, torch.device)
# The hook and state tables every nn.Module creates for itself in __init__.
_HOOK_TABLES = frozenset(k for k in nn.Module().__dict__ if k not in ("_parameters", "_buffers", "_modules", "training"))


def _plain(mod: nn.Module) -> bool:
    cls = type(mod)
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and (cls.__setstate__ is nn.Module.__setstate__ or _fills_defaults(cls.__setstate__))
    )


def _fills_defaults(setstate: Any) -> bool:
    """torch.nn's own ``__setstate__`` overrides (conv, softmax, ...) only fill attributes that modules pickled
    by old torch versions lack; a live module has them all, so copying its ``__dict__`` is equivalent."""
    return getattr(setstate, "__module__", "").startswith("torch.nn.modules.")


def _copy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(mod, memo)``, with a fast path for plain modules (about 5x faster on a ResNet-50).

    A module whose class customises copying or pickling goes through ``copy.deepcopy``; in a plain module,
    empty hook dictionaries are recreated, immutable attributes kept, and everything else deep-copied with
    the shared memo, so references between modules and to (possibly shared) parameters stay consistent.
    """
    if id(mod) in memo:
        return memo[id(mod)]
    if not _plain(mod):
        return copy.deepcopy(mod, memo)
    new = object.__new__(type(mod))
    memo[id(mod)] = new
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key == "_modules":
            state[key] = {k: None if m is None else _copy_module(m, memo) for k, m in value.items()}
        elif isinstance(value, _IMMUTABLE) or (type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value)):
            state[key] = value
        elif key in ("_parameters", "_buffers") and type(value) is dict:
            state[key] = {k: _copy_tensor(t, memo) for k, t in value.items()}
        elif key in _HOOK_TABLES and type(value) in (dict, OrderedDict, set) and not value:
            state[key] = type(value)()  # nn.Module's own per-instance tables: never shared
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def _copy_tensor(t: torch.Tensor | None, memo: dict[int, Any]) -> torch.Tensor | None:
    """``copy.deepcopy(t, memo)`` for a module's own parameter or buffer, without the generic machinery."""
    if t is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    if type(t) is torch.Tensor and t.is_leaf and not t.requires_grad and not t.__dict__:
        new = t.clone(memory_format=torch.preserve_format)
        memo[id(t)] = new
        return new
    return copy.deepcopy(t, memo)
