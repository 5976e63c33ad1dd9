"""A plain PyTorch fine-tuning loop with optional knowledge distillation, for recovering pruned models.

The loop trains the student in place (that is its job); every other object it touches - the teacher, the
loader - is left as it was found. It runs on CPU or CUDA, and under ``torchrun`` with ``ddp=True`` or on a
student sharded with FSDP.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fxprune.errors import TrainModeError
from fxprune.metrics import eval_mode
from fxprune.recovery.distill import check_kd_args, kd_loss

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch of ``finetune`` measured.

    Attributes:
        epoch: 1-based epoch number.
        loss: mean training loss over the epoch's samples (the quantity minimised).
        kd_loss: mean distillation term ``T**2 * KL`` (unweighted by ``alpha``), None without a teacher.
        ce_loss: mean cross-entropy against the labels.
        metric: ``eval_fn(student)`` after the epoch, None without ``eval_fn``.
        seconds: wall time of the epoch's training and evaluation.
    """

    epoch: int
    loss: float
    kd_loss: float | None
    ce_loss: float
    metric: float | None
    seconds: float


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _split_batch(batch: Any, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A batch is ``(inputs, targets)``; ``inputs`` is a tensor or a tuple of the model's positional inputs."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"finetune expects batches of (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    inputs, targets = batch
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    non_blocking = device.type == "cuda"
    return tuple(x.to(device, non_blocking=non_blocking) for x in inputs), targets.to(device, non_blocking=non_blocking)


def _logits(out: Any, who: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):  # e.g. Hugging Face model outputs
        return out.logits
    raise ValueError(f"the {who} returned {type(out).__name__}; finetune needs a (batch, classes) logits tensor")


def _scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int | None
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]:
    """Cosine decay to zero over the whole run, stepped per batch (per epoch when the loader has no length)."""
    if schedule == "constant" or epochs == 0:
        return None, False
    per_step = steps_per_epoch is not None and steps_per_epoch > 0
    total = epochs * steps_per_epoch if per_step and steps_per_epoch else epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    return sched, per_step


def _check_args(epochs: int, lr: float, schedule: str, ddp: bool) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if ddp and not _distributed():
        raise ValueError(
            "ddp=True needs an initialised process group: launch with torchrun and call "
            "torch.distributed.init_process_group() before finetune (see docs/recovery.md)"
        )


def _already_parallel(student: nn.Module) -> bool:
    """Whether ``student`` averages gradients across ranks by itself.

    True for a ``DistributedDataParallel`` and for a model sharded with FSDP anywhere in its tree
    (``fully_shard``, FSDP2, or ``FullyShardedDataParallel``); such a student is trained as it is.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    kinds = (DistributedDataParallel, FullyShardedDataParallel, FSDPModule)
    return any(isinstance(m, kinds) for m in student.modules())


def _check_sampler(train_loader: Iterable[Any]) -> None:
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
        log.warning("finetune: the loader has no DistributedSampler, so every rank sees the whole data set")


def _wrap_ddp(student: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(student, device_ids=[index])
    return DistributedDataParallel(student)


def _broadcast_buffers(student: nn.Module) -> None:
    """Copy rank 0's buffers to every rank.

    DDP broadcasts buffers before each forward, but every rank's last forward then updates its own copy
    (BatchNorm running statistics) from its own batch; FSDP never syncs buffers. Without this the ranks
    would end an epoch with different models.
    """
    with torch.no_grad():
        for buf in student.buffers():
            dist.broadcast(buf, src=0)


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    return asked.type == actual.type and (asked.index is None or asked.index == actual.index)


def finetune(
    student: nn.Module,
    train_loader: Iterable[Any],
    *,
    teacher: nn.Module | None = None,
    epochs: int,
    lr: float,
    alpha: float = 0.5,
    temperature: float = 4.0,
    eval_fn: Callable[[nn.Module], float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    ddp: bool = False,
    schedule: str = "cosine",
) -> list[EpochMetrics]:
    """Fine-tune ``student`` in place, with cross-entropy or with distillation from ``teacher``.

    The loss is ``alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE`` with a
    teacher and plain cross-entropy without one (see ``kd_loss``). The teacher runs in eval mode under
    ``torch.no_grad`` on its own device and is not modified. Any ``nn.Module`` works as the student,
    including the ``torch.fx.GraphModule`` that ``fxprune.prune`` returns.

    Args:
        student: the model to train; its weights are updated in place and its per-module training flags are
            restored at the end.
        train_loader: an iterable of ``(inputs, targets)`` batches; ``inputs`` is a tensor or a tuple of
            positional inputs, ``targets`` integer labels. The model must return ``(batch, classes)`` logits.
        teacher: the model to distil from (usually the unpruned model); None for plain cross-entropy.
        epochs: passes over ``train_loader`` (0 returns an empty list).
        lr: peak learning rate of the default optimizer (SGD, momentum 0.9); ignored when ``optimizer`` is given.
        alpha: weight of the distillation term, in [0, 1].
        temperature: distillation temperature ``T`` > 0.
        eval_fn: called as ``eval_fn(student)`` after each epoch, with the student in eval mode under
            ``torch.no_grad``; its float result is recorded as ``metric``.
        optimizer: an optimizer over the student's parameters, used instead of the default.
        device: where to train; the student is moved there. Default: the student's current device. A
            student already wrapped in DDP or sharded with FSDP stays where its wrapper put it.
        progress: show a tqdm bar per epoch and print each epoch's result line to stderr, on rank 0 only
            under torch.distributed (the INFO log record is also emitted on rank 0 only).
        ddp: wrap the student in ``DistributedDataParallel``; needs an initialised process group (torchrun).
            Losses are then averaged over all ranks, and rank 0's buffers (BatchNorm statistics) are
            broadcast after every epoch so that all ranks hold the same model. Without it every rank trains
            independently. A student that is already a ``DistributedDataParallel`` or sharded with FSDP
            (``fully_shard`` or ``FullyShardedDataParallel``) is trained as it is, with the same averaging
            and broadcast, whatever ``ddp`` says.
        schedule: "cosine" (decay to zero over the run, per batch) or "constant" learning rate; it also
            drives a given ``optimizer``.

    Returns:
        One ``EpochMetrics`` per epoch, also logged at INFO level.

    Raises:
        ValueError: on bad arguments, batches that are not ``(inputs, targets)``, non-tensor outputs, or a
            ``device`` other than where a wrapped (DDP/FSDP) student lives.
        TrainModeError: ``student`` is a pruned GraphModule whose model behaves differently in train mode
            (functional dropout, auxiliary outputs); fine-tune the ``output="module"`` result instead.
    """
    _check_args(epochs, lr, schedule, ddp)
    check_kd_args(alpha, temperature)
    why = getattr(student, "_fxprune_train_differs", "")
    if why and epochs > 0:  # training it would silently train the eval-mode graph (no dropout, no aux outputs)
        raise TrainModeError(
            f"this pruned GraphModule cannot train like your model ({why}); prune with output='module' and "
            "fine-tune that (your own classes keep their train-mode code)"
        )
    distributed = _distributed()
    rank0 = not distributed or dist.get_rank() == 0
    wrapped = distributed and _already_parallel(student)  # DDP or FSDP already averages the gradients
    parallel = ddp or wrapped
    if wrapped:  # FSDP/DDP placed the parameters; moving them here would fight the wrapper
        if device is not None and not _same_device(torch.device(device), _device_of(student)):
            raise ValueError(
                f"device={device!r}, but the wrapped (DDP/FSDP) student is on {_device_of(student)}; "
                "place it when you wrap it and leave device=None"
            )
        device = _device_of(student)
    else:
        device = torch.device(device) if device is not None else _device_of(student)
        student.to(device)
    if distributed and not parallel and rank0:
        log.warning("finetune: torch.distributed is initialised but ddp=False; each rank trains its own copy")
    if parallel and rank0:
        _check_sampler(train_loader)
    opt = optimizer if optimizer is not None else torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    try:
        steps_per_epoch: int | None = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    sched, per_step = _scheduler(opt, schedule, epochs, steps_per_epoch)
    model = _wrap_ddp(student, device) if ddp and not wrapped else student
    teacher_device = _device_of(teacher) if teacher is not None else None
    flags = [(m, m.training) for m in student.modules()]
    history: list[EpochMetrics] = []
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch only when told
                sampler.set_epoch(epoch)
            student.train()
            # Running sums of loss * n, kd * n, ce * n and n, kept on the device to avoid a sync per batch.
            sums = torch.zeros(4, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
            bar = tqdm(train_loader, desc=f"finetune {epoch}/{epochs}", disable=not (progress and rank0), leave=False)
            for i, batch in enumerate(bar):
                inputs, targets = _split_batch(batch, device)
                teacher_logits = None
                if teacher is not None:
                    assert teacher_device is not None
                    with eval_mode(teacher), torch.no_grad():
                        out = teacher(*(x.to(teacher_device) for x in inputs))
                    teacher_logits = _logits(out, "teacher").to(device)
                terms = kd_loss(
                    _logits(model(*inputs), "student"), targets, teacher_logits, alpha=alpha, temperature=temperature
                )
                opt.zero_grad(set_to_none=True)
                terms.total.backward()
                opt.step()
                if sched is not None and per_step:
                    sched.step()
                n = float(targets.shape[0])
                kd = terms.kd.detach() if terms.kd is not None else torch.zeros((), device=device)
                sums[:3] += torch.stack([terms.total.detach(), kd, terms.ce.detach()]).to(sums.dtype) * n
                sums[3] += n
                if progress and rank0 and i % 10 == 0:
                    bar.set_postfix(loss=f"{float(sums[0] / sums[3]):.4f}")
            if sched is not None and not per_step:
                sched.step()
            if parallel:
                dist.all_reduce(sums)
                _broadcast_buffers(student)  # every rank evaluates, and ends with, rank 0's model
            count = float(sums[3])
            if count == 0:
                raise ValueError("train_loader produced no batches")
            metric = None
            if eval_fn is not None:
                with eval_mode(student), torch.no_grad():
                    metric = float(eval_fn(student))
            record = EpochMetrics(
                epoch=epoch,
                loss=float(sums[0]) / count,
                kd_loss=float(sums[1]) / count if teacher is not None else None,
                ce_loss=float(sums[2]) / count,
                metric=metric,
                seconds=time.perf_counter() - t0,
            )
            history.append(record)
            if rank0:
                line = (f"finetune epoch {epoch}/{epochs}: loss {record.loss:.4f}, kd "
                        f"{'-' if record.kd_loss is None else f'{record.kd_loss:.4f}'}, ce {record.ce_loss:.4f}, "
                        f"metric {'-' if metric is None else f'{metric:.4f}'} ({record.seconds:.1f}s)")
                log.info(line)
                if progress:  # the bar goes away with its epoch; its result stays on screen (or in the log)
                    tqdm.write(line, file=sys.stderr)
    finally:
        for module, flag in flags:
            module.training = flag
    return history
