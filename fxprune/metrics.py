"""Model cost metrics: unique parameter count, MACs and CPU/GPU latency.

All functions leave the model exactly as they found it: the per-module training flags are restored and
no parameter or buffer is written (the model runs in eval mode under ``torch.no_grad``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

__all__ = ["LatencyReport", "compare_latency", "count_macs", "count_params", "default_threads", "eval_mode",
           "measure_latency"]

NOISY_SPREAD = 0.25  # (p90 - p10) / median above this: the figures are reported as noisy


def default_threads() -> int:
    """A thread count that gives stable timings: half the cores, at most 4 (1 on a 2-core machine).

    With every core busy, one background process (or the other model's allocator) stalls a whole
    forward; timings on a shared small machine then vary by 10x or more.
    """
    import os

    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class LatencyReport:
    """Wall-clock latency of one forward pass.

    Attributes:
        median_ms: Median latency over the timed runs, in milliseconds.
        p90_ms: 90th percentile latency (linear interpolation), in milliseconds.
        p10_ms: 10th percentile latency, in milliseconds.
        runs: Number of timed runs (warm-up runs excluded).
        threads: ``torch.get_num_threads()`` while the runs were timed.
    """

    median_ms: float
    p90_ms: float
    runs: int
    threads: int
    p10_ms: float = 0.0

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the runs were (above ``NOISY_SPREAD``, don't trust small ratios)."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own training flag on exit.

    ``model.train(flag)`` would overwrite mixed states (e.g. a frozen BatchNorm kept in eval inside a
    training model); this restores each module's flag individually.

    Args:
        model: The module to switch.

    Yields:
        The same module, in eval mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _as_tuple(example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Accept a single tensor or a sequence of tensors and return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def count_params(model: nn.Module) -> int:
    """Count the model's parameters, each distinct tensor once.

    Tied weights count once whether they are the same ``nn.Parameter`` object registered under two names
    or two ``nn.Parameter`` objects viewing the same memory with the same shape and layout.

    Args:
        model: The module to count.

    Returns:
        The number of scalar parameters.
    """
    seen: set[object] = set()
    total = 0
    for param in model.parameters():  # already deduplicates identical Parameter objects
        if param.device.type == "meta" or param.data_ptr() == 0:
            key: object = id(param)
        else:
            key = (str(param.device), param.data_ptr(), tuple(param.shape), param.stride(), param.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += param.numel()
    return total


def _missing_formulas() -> dict[object, object]:
    """Shape formulas for kernels ``FlopCounterMode`` does not know: scaled dot-product attention on the CPU
    runs ``_scaled_dot_product_flash_attention_for_cpu``, which it would count as zero."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: object,
             out_shape: object = None, **kwargs: object) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if kernel is None else {kernel: sdpa}


def count_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> int:
    """Count multiply-accumulates of one forward pass with ``torch.utils.flop_counter``.

    Counts what ``FlopCounterMode`` counts: convolutions, linear layers (``addmm``/``mm``), ``matmul``,
    ``bmm``/``baddbmm`` and scaled-dot-product attention (also the CPU kernel, whose formula
    ``FlopCounterMode`` lacks); element-wise ops, norms and bias additions are not counted. MACs are
    ``flops // 2``.

    Args:
        model: The module to measure. It is never run itself: a private copy runs in eval mode under
            ``torch.no_grad`` (a forward may update buffers or even parameters, ``Embedding(max_norm=...)``).
            The copy's tensors are on the meta device (shapes only: no memory, no arithmetic, as the counts
            depend on shapes alone); a forward that needs values (data-dependent routing, ``.item()``) runs
            on a full copy instead.
        example_inputs: Positional inputs of one forward call.

    Returns:
        The number of MACs.
    """
    import copy

    from fxprune import fast

    inputs = _as_tuple(example_inputs)
    if fast.ENABLED and not _uses_cuda(inputs, model):
        try:
            meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
            return _count(fast.meta_copy(model), meta_inputs)
        except Exception as e:  # noqa: BLE001 - a forward that reads values: counted on real tensors below
            logger.debug("count_macs: the shape-only run failed (%s: %s); counting on a full copy", type(e).__name__, e)
    return _count(copy.deepcopy(model), inputs)


def _count(private: nn.Module, inputs: tuple[Any, ...]) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_missing_formulas())
    # nn.MultiheadAttention's eval fast path is one fused kernel that FlopCounterMode has no formula for
    # (its MACs would count as 0); the standard path computes the same with counted ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with eval_mode(private), torch.no_grad(), counter:
            private(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    flops = int(counter.get_total_flops())
    logger.debug("count_macs: %d flops -> %d MACs", flops, flops // 2)
    return flops // 2


def _uses_cuda(inputs: tuple[torch.Tensor, ...], model: nn.Module) -> bool:
    """Whether the model or its inputs live on a GPU (then timing must synchronize)."""
    first_param = next(model.parameters(), None)
    tensors = [*inputs, first_param]
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def _no_op() -> None:
    """Do nothing (stands in for ``torch.cuda.synchronize`` on CPU)."""


def measure_latency(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> LatencyReport:
    """Time the forward pass with ``time.perf_counter``.

    Args:
        model: The module to time; it is run in eval mode under ``torch.no_grad``.
        example_inputs: Positional inputs of one forward call.
        runs: Number of timed runs (at least 1).
        warmup: Number of untimed runs before timing.
        threads: If given, ``torch.set_num_threads(threads)`` for the measurement; the previous
            setting is restored afterwards.

    Returns:
        The latency report.

    Raises:
        ValueError: If ``runs < 1``, ``warmup < 0`` or ``threads < 1``.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    inputs = _as_tuple(example_inputs)
    sync = torch.cuda.synchronize if _uses_cuda(inputs, model) else _no_op
    previous_threads = torch.get_num_threads()
    times_ms: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with eval_mode(model), torch.no_grad():
            for _ in range(warmup):
                model(*inputs)
            sync()
            for _ in range(runs):
                start = time.perf_counter()
                model(*inputs)
                sync()
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        if threads is not None:
            torch.set_num_threads(previous_threads)
    report = _report(times_ms, used_threads)
    logger.debug("measure_latency: %s", report)
    return report


def _report(times_ms: list[float], threads: int) -> LatencyReport:
    return LatencyReport(median_ms=float(np.median(times_ms)), p90_ms=float(np.percentile(times_ms, 90)),
                         runs=len(times_ms), threads=threads, p10_ms=float(np.percentile(times_ms, 10)))


def compare_latency(
    models: Sequence[nn.Module],
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> list[LatencyReport]:
    """Time several models on the same inputs, interleaved: run ``k`` times each model once, in an order
    that alternates, so a slow spell of the machine falls on every model alike (a before/after ratio is
    then trustworthy where separate measurements were not: 0.91x for two identical models).

    Args:
        models: the models to compare (each runs in eval mode under ``torch.no_grad``; flags restored).
        example_inputs: positional inputs of one forward call, the same for every model.
        runs: timed runs per model (at least 1).
        warmup: untimed runs per model first.
        threads: ``torch.set_num_threads`` for the measurement (default ``default_threads()``); restored.

    Returns:
        One ``LatencyReport`` per model, in order. A spread above ``NOISY_SPREAD`` is logged as a warning.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs} and {warmup}")
    inputs = _as_tuple(example_inputs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    times: list[list[float]] = [[] for _ in models]
    try:
        used = torch.get_num_threads()
        with contextlib.ExitStack() as stack, torch.no_grad():
            for m in models:
                stack.enter_context(eval_mode(m))
            for _ in range(warmup):
                for m in models:
                    m(*inputs)
            for k in range(runs):
                order = range(len(models)) if k % 2 == 0 else reversed(range(len(models)))
                for i in order:
                    start = time.perf_counter()
                    models[i](*inputs)
                    times[i].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    reports = [_report(t, used) for t in times]
    noisy = [r for r in reports if r.spread > NOISY_SPREAD]
    if noisy:
        logger.warning("latency figures are noisy (p10-p90 spread up to %.0f%% of the median): the machine is busy; "
                       "close other programs, use more runs or fewer threads", 100 * max(r.spread for r in noisy))
    return reports
