"""Unstructured and N:M (2:4) magnitude sparsity, as ``torch.nn.utils.prune`` masks.

Masks zero weights; they shrink nothing and speed nothing up on dense hardware: the tensors keep their
shapes and every multiply still happens. Use them to study accuracy at a sparsity level, or to feed a
sparse kernel (2:4 on GPUs with sparse tensor cores). Structured pruning (``fxprune.compile``) is what
makes a model physically smaller and faster on ordinary hardware.

All functions work on a deep copy unless ``inplace=True``, so the caller's model is left alone.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

log = logging.getLogger(__name__)

DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
METHODS: dict[str, type[prune.BasePruningMethod]] = {"l1": prune.L1Unstructured, "random": prune.RandomUnstructured}


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros in one layer's weight.

    Attributes:
        name: qualified module name.
        zeros: number of weight entries equal to zero (masked or not).
        total: number of weight entries.
        fraction: ``zeros / total``.
    """

    name: str
    zeros: int
    total: int
    fraction: float


def _pruning_hooks(model: nn.Module) -> list[tuple[nn.Module, prune.BasePruningMethod]]:
    return [(m, h) for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inplace:
        return model
    # A masked weight is a computed (non-leaf) tensor that deepcopy refuses; copy a detached stand-in and
    # recompute it on the copy from the copy's own ``*_orig`` and ``*_mask``.
    memo: dict[int, object] = {}
    for module, hook in _pruning_hooks(model):
        tensor = getattr(module, hook._tensor_name, None)
        if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
            memo[id(tensor)] = tensor.detach().clone()
    out = copy.deepcopy(model, memo)
    for module, hook in _pruning_hooks(out):
        setattr(module, hook._tensor_name, hook.apply_mask(module))
    return out


def _layers(model: nn.Module, layers: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, layers) and hasattr(m, "weight")]
    if not found:
        raise ValueError(f"the model has no {', '.join(t.__name__ for t in layers)} layer with a weight")
    return found


def unstructured(
    model: nn.Module,
    amount: float,
    *,
    method: str = "l1",
    global_: bool = False,
    layers: tuple[type[nn.Module], ...] = DEFAULT_LAYERS,
    inplace: bool = False,
) -> nn.Module:
    """Mask ``amount`` of the weights of every matching layer, by magnitude or at random.

    Args:
        model: the model to sparsify.
        amount: fraction of weights masked, 0 <= amount <= 1 (``prune`` rounds ``amount * numel``).
        method: "l1" (smallest ``|w|``) or "random".
        global_: rank all matching layers' weights together (``prune.global_unstructured``), so per-layer
            sparsity varies and only the overall fraction equals ``amount``.
        layers: module types whose ``weight`` is masked.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The masked model (``weight_orig`` and ``weight_mask`` per layer, as ``torch.nn.utils.prune`` does).

    Raises:
        ValueError: on an unknown method, an out-of-range amount, or a model without matching layers.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount!r}")
    out = _target(model, inplace)
    found = _layers(out, layers)
    if global_:
        prune.global_unstructured([(m, "weight") for _, m in found], pruning_method=METHODS[method], amount=float(amount))
    else:
        apply = prune.l1_unstructured if method == "l1" else prune.random_unstructured
        for _, m in found:
            apply(m, "weight", amount=float(amount))
    log.info("unstructured %s sparsity %.2f (%s) on %d layers", method, amount, "global" if global_ else "per layer",
             len(found))
    return out


def n_m_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask of ``weight``: in every group of ``m`` consecutive input-dim weights keep the ``n`` largest ``|w|``.

    The input dim is dim 1 (``Linear``: ``(out, in)``, ``Conv``: ``(out, in, *kernel)``); groups run along it
    for each output channel and kernel position, as sparse tensor cores expect.

    Args:
        weight: a weight with at least 2 dims whose dim 1 is divisible by ``m``.
        n: weights kept per group.
        m: group size.

    Returns:
        A mask of ``weight``'s shape and dtype with exactly ``n`` ones in every group.
    """
    moved = weight.detach().movedim(1, -1)  # (out, *kernel, in): groups along the input dim
    groups = moved.abs().reshape(-1, m)
    keep = groups.topk(n, dim=1).indices
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
    return mask.reshape(moved.shape).movedim(-1, 1).contiguous()


def n_m(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    layers: tuple[type[nn.Module], ...] = DEFAULT_LAYERS,
    inplace: bool = False,
) -> nn.Module:
    """Apply N:M magnitude sparsity (2:4 by default) with ``prune.custom_from_mask``.

    Layers whose input dim is not divisible by ``m`` (e.g. a first conv on 3 channels, depthwise convs) are
    skipped and logged; ``sparsity_report`` shows which.

    Args:
        model: the model to sparsify.
        n: weights kept in every group of ``m``, 1 <= n <= m.
        m: group size along the input dim.
        layers: module types whose ``weight`` is masked.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The masked model.

    Raises:
        ValueError: on bad ``n``/``m`` or when no matching layer can take the pattern.
    """
    for value, what in ((n, "n"), (m, "m")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if n > m:
        raise ValueError(f"n must be <= m (n weights kept out of every m), got n={n}, m={m}")
    out = _target(model, inplace)
    applied = 0
    for name, mod in _layers(out, layers):
        weight = mod.weight
        if weight.dim() < 2 or weight.shape[1] % m:
            log.warning("n_m: skipping %s: input dim of weight %s is not divisible by %d", name, tuple(weight.shape), m)
            continue
        prune.custom_from_mask(mod, "weight", mask=n_m_mask(weight, n, m))
        applied += 1
    if applied == 0:
        raise ValueError(f"no layer has an input dim divisible by m={m}; nothing to sparsify")
    log.info("n_m: %d:%d sparsity on %d layers", n, m, applied)
    return out


def sparsity_report(model: nn.Module, layers: tuple[type[nn.Module], ...] = DEFAULT_LAYERS) -> list[LayerSparsity]:
    """Count the zeros of every matching layer's (effective, i.e. masked) weight.

    Args:
        model: any model, masked or not.
        layers: module types reported.

    Returns:
        One ``LayerSparsity`` per layer, in module order.
    """
    report = []
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, layers) and isinstance(weight, torch.Tensor):
            zeros, total = int((weight == 0).sum()), weight.numel()
            report.append(LayerSparsity(name, zeros, total, zeros / total if total else 0.0))
    return report


def make_permanent(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into its weight (``prune.remove``): plain parameters, zeros kept.

    Args:
        model: a masked model.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The model without masks, hooks or ``*_orig`` parameters.
    """
    out = _target(model, inplace)
    for module, hook in _pruning_hooks(out):
        prune.remove(module, hook._tensor_name)
    return out
