"""The knowledge-distillation loss used to recover a pruned student from its unpruned teacher.

Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": the student matches the teacher's
softened class distribution, and the ``T**2`` factor keeps the gradient scale of the soft term independent
of the temperature, so ``alpha`` means the same thing at every ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossTerms:
    """One batch's loss, with its parts.

    Attributes:
        total: the loss to minimise: ``alpha * kd + (1 - alpha) * ce`` with a teacher, ``ce`` without.
        kd: the distillation term ``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` (mean over the
            batch, not yet weighted by ``alpha``), or None without a teacher.
        ce: cross-entropy of the student's logits against the hard labels (mean over the batch).
    """

    total: torch.Tensor
    kd: torch.Tensor | None
    ce: torch.Tensor


def check_kd_args(alpha: float, temperature: float) -> None:
    """Raise ``ValueError`` unless ``0 <= alpha <= 1`` and ``temperature > 0``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (the weight of the distillation term), got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> LossTerms:
    """Distillation loss ``alpha * T**2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets)``.

    With ``teacher_logits=None`` the result is plain cross-entropy and ``alpha``/``temperature`` play no role.

    Args:
        student_logits: ``(batch, classes)`` logits of the model being trained.
        targets: ``(batch,)`` integer class labels.
        teacher_logits: ``(batch, classes)`` logits of the teacher (gradients are not taken through them).
        alpha: weight of the distillation term, in [0, 1].
        temperature: softmax temperature ``T`` (> 0) applied to both sets of logits in the KL term.

    Returns:
        The total loss and its two parts.

    Raises:
        ValueError: on a bad ``alpha``/``temperature`` or when the logits' shapes differ.
    """
    check_kd_args(alpha, temperature)
    ce = F.cross_entropy(student_logits, targets)
    if teacher_logits is None:
        return LossTerms(total=ce, kd=None, ce=ce)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits have shape {tuple(teacher_logits.shape)}, the student's {tuple(student_logits.shape)}; "
            "distillation needs the same classes in the same order"
        )
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=-1)
    # "batchmean" is the true KL divergence averaged over samples ("mean" would also divide by classes).
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    kd = kl * (t * t)
    return LossTerms(total=alpha * kd + (1.0 - alpha) * ce, kd=kd, ce=ce)
