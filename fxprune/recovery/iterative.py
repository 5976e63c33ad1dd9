"""Iterative pruning: reach a target ratio in several smaller cuts with fine-tuning between them.

Each step prunes the current (already pruned) model with ``fxprune.prune``; the per-step ratio is chosen so
the kept fractions multiply to the target: ``keep_step = (1 - target_ratio) ** (1 / steps)``. Every step
removes ``floor(r_step * size)`` channels per group (see ``select_channels``), so after several steps a group
can keep a channel or two more than one cut at ``target_ratio`` would; the history records the real counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxprune.api import prune
from fxprune.metrics import count_macs, count_params, eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IterativeStep:
    """The state after one prune-and-fine-tune step.

    Attributes:
        step: 1-based step number.
        ratio: nominal cumulative fraction of channels removed so far, ``1 - keep_step ** step``.
        step_ratio: the ratio passed to ``fxprune.prune`` in this step.
        params: parameters of the model after this step.
        macs: MACs of one forward pass on ``example_inputs``.
        metric_pruned: ``eval_fn`` right after the cut, before fine-tuning.
        metric: ``eval_fn`` after fine-tuning.
    """

    step: int
    ratio: float
    step_ratio: float
    params: int
    macs: int
    metric_pruned: float
    metric: float


@dataclass(frozen=True)
class IterativeResult:
    """What ``iterative`` produced.

    Attributes:
        model: the final pruned and fine-tuned model, the ``GraphModule`` from ``fxprune.prune`` unless
            ``finetune_fn`` returned another module (a new object either way; the input model is untouched).
        history: one ``IterativeStep`` per step, in order.
        params_before: parameters of the input model.
        macs_before: MACs of the input model on ``example_inputs``.
        metric_before: ``eval_fn`` of the input model.
    """

    model: nn.Module
    history: tuple[IterativeStep, ...]
    params_before: int
    macs_before: int
    metric_before: float


def step_ratio(target_ratio: float, steps: int) -> float:
    """The per-step ratio whose ``steps``-fold application keeps ``1 - target_ratio`` of each group.

    Args:
        target_ratio: final fraction of channels removed, 0 <= target_ratio < 1.
        steps: number of pruning steps, >= 1.

    Returns:
        ``1 - (1 - target_ratio) ** (1 / steps)``.

    Raises:
        ValueError: on an out-of-range ``target_ratio`` or ``steps``.
    """
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not 0.0 <= target_ratio < 1.0:
        raise ValueError(f"target_ratio must be a number with 0 <= target_ratio < 1, got {target_ratio!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return 1.0 - (1.0 - float(target_ratio)) ** (1.0 / steps)


def _evaluate(eval_fn: Callable[[nn.Module], float], model: nn.Module) -> float:
    with eval_mode(model), torch.no_grad():
        return float(eval_fn(model))


def iterative(
    model: nn.Module,
    example_inputs: Any,
    *,
    target_ratio: float,
    steps: int,
    finetune_fn: Callable[[nn.Module], Any],
    eval_fn: Callable[[nn.Module], float],
    **prune_kwargs: Any,
) -> IterativeResult:
    """Prune ``model`` to ``target_ratio`` in ``steps`` cuts, fine-tuning after each cut.

    A budget form (``target_macs=``, searching the ratio that meets a MAC budget) is not implemented yet.

    Args:
        model: the model to prune; it is never modified.
        example_inputs: a tensor or tuple of tensors the model accepts (used for pruning and MACs).
        target_ratio: cumulative fraction of channels removed per prunable group, 0 <= target_ratio < 1.
        steps: number of prune-and-fine-tune steps, >= 1 (1 is one-shot pruning plus fine-tuning).
        finetune_fn: called as ``finetune_fn(pruned)`` after every cut; trains the model in place (for example
            a ``functools.partial`` of ``fxprune.recovery.finetune``). If it returns an ``nn.Module``, that
            module replaces the pruned one.
        eval_fn: ``eval_fn(model) -> float``, called in eval mode under ``torch.no_grad``.
        **prune_kwargs: passed on to ``fxprune.prune`` (``ignore``, ``importance``, ``verify``, ...).

    Returns:
        The final model and the per-step history.

    Raises:
        ValueError: on an out-of-range ``target_ratio`` or ``steps``, or a ``ratio`` in ``prune_kwargs``.
    """
    r_step = step_ratio(target_ratio, steps)
    if "ratio" in prune_kwargs:
        raise ValueError("pass target_ratio=, not ratio=; iterative chooses the per-step ratio itself")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    params_before = count_params(model)
    macs_before = count_macs(model, inputs)
    metric_before = _evaluate(eval_fn, model)
    log.info("iterative: %d steps of ratio %.4f towards %.3f; before: %d params, metric %.4f",
             steps, r_step, target_ratio, params_before, metric_before)
    current: nn.Module = model
    history: list[IterativeStep] = []
    for step in range(1, steps + 1):
        result = prune(current, r_step, example_inputs=inputs, **prune_kwargs)  # a new model every step
        if not result.modified:
            log.warning("iterative step %d: ratio %.4f removed no channel (groups too small)", step, r_step)
        current = result.model
        metric_pruned = _evaluate(eval_fn, current)
        returned = finetune_fn(current)
        if isinstance(returned, nn.Module):
            current = returned
        record = IterativeStep(
            step=step,
            ratio=1.0 - (1.0 - r_step) ** step,
            step_ratio=r_step,
            params=count_params(current),
            macs=count_macs(current, inputs),
            metric_pruned=metric_pruned,
            metric=_evaluate(eval_fn, current),
        )
        history.append(record)
        log.info("iterative step %d/%d: %d params, %d MACs, metric %.4f after the cut, %.4f after fine-tuning",
                 step, steps, record.params, record.macs, record.metric_pruned, record.metric)
    return IterativeResult(current, tuple(history), params_before, macs_before, metric_before)
