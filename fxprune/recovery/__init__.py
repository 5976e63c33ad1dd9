"""Recovery after pruning: fine-tuning with knowledge distillation, and iterative pruning.

    import functools
    from fxprune.recovery import finetune, iterative

    history = finetune(pruned, train_loader, teacher=model, epochs=5, lr=0.01, eval_fn=accuracy)
    result = iterative(model, x, target_ratio=0.7, steps=3, eval_fn=accuracy,
                       finetune_fn=functools.partial(finetune, train_loader=train_loader, epochs=2, lr=0.01))
"""

from __future__ import annotations

from fxprune.recovery.batchnorm import recalibrate_batchnorm
from fxprune.recovery.distill import LossTerms, kd_loss
from fxprune.recovery.finetune import EpochMetrics, finetune
from fxprune.recovery.iterative import IterativeResult, IterativeStep, iterative, step_ratio

__all__ = [
    "EpochMetrics",
    "IterativeResult",
    "IterativeStep",
    "LossTerms",
    "finetune",
    "iterative",
    "kd_loss",
    "recalibrate_batchnorm",
    "step_ratio",
]
