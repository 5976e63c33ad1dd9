"""Check an ONNX file in onnxruntime against the PyTorch model it was exported from.

``export_onnx`` (``passes/export.py``) calls :func:`check_onnx` on seeded random inputs from
:func:`make_check_inputs` before it moves a file into place; the CLI and the int8 pass open their
sessions with :func:`ort_session_options`, whose log level :data:`ORT_LOG_SEVERITY` sets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn

from fxprune.errors import ExportError
from fxprune.metrics import eval_mode
from fxprune.state import kept_buffers

__all__ = ["ORT_LOG_SEVERITY", "check_onnx", "flatten_outputs", "input_tensors", "make_check_inputs",
           "ort_session_options"]

Inputs = tuple[torch.Tensor, ...]
# onnxruntime's C++ log severity in the sessions fxprune opens (0 verbose, 1 info, 2 warning, 3 error, 4 fatal):
# error unless a caller sets it (the CLI's --ort-log-level); info and verbose print arena and allocator traces.
ORT_LOG_SEVERITY: ContextVar[int] = ContextVar("fxprune_ort_log_severity", default=3)


def ort_session_options() -> Any:
    """New ``onnxruntime.SessionOptions`` whose log severity is :data:`ORT_LOG_SEVERITY` (error by default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY.get()
    return options



def flatten_outputs(output: Any) -> list[torch.Tensor]:
    """Flatten nested tuples/lists/dicts of tensors in the order the exporters give ONNX outputs.

    Raises:
        ExportError: If a leaf is neither a tensor nor ``None``.
    """
    if output is None:
        return []
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flatten_outputs(item)]
    raise ExportError(
        f"model output contains a {type(output).__name__}; only tensors (in tuples/lists/dicts) can be "
        "exported to ONNX — return tensors from forward()"
    )


def _random_like(example: torch.Tensor, batch: int | None, gen: torch.Generator) -> torch.Tensor:
    """A seeded random tensor with ``example``'s dtype/device, its batch dim set to ``batch`` if given."""
    shape = list(example.shape)
    if batch is not None and shape:
        shape[0] = batch
    if example.dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(example.dtype).to(example.device)
    # integer inputs (e.g. indices) stay inside the example's value range; bools are 0/1
    lo, hi = (int(example.min()), int(example.max())) if example.numel() else (0, 0)
    lo, hi = (0, 1) if example.dtype == torch.bool else (lo, hi)
    return torch.randint(lo, hi + 1, shape, generator=gen).to(example.dtype).to(example.device)


def input_tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of an input tuple in ONNX input order (a list argument, such as a detector's images,
    gives one ONNX input per tensor)."""
    return [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])]


def make_check_inputs(example_inputs: Inputs, n: int, *, dynamic_batch: bool, seed: int = 0) -> list[Inputs]:
    """Seeded random input tuples shaped like ``example_inputs``.

    With ``dynamic_batch`` the batch dimension alternates 1, 2, 1, ...; otherwise the example's shapes
    are kept. The global RNG is not touched.
    """
    gen = torch.Generator().manual_seed(seed)
    batches: list[int | None] = [1, 2] if dynamic_batch else [None]

    def like(x: Any, batch: int | None) -> Any:
        if isinstance(x, (list, tuple)):  # a list of tensors (images of a detector): each keeps its shape
            return [_random_like(t, None, gen) for t in x]
        return _random_like(x, batch, gen)

    return [tuple(like(x, batches[i % len(batches)]) for x in example_inputs) for i in range(n)]


def _compare(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float, where: str) -> float:
    """Return max |a - e|; raise ExportError if ``|a - e| > atol * scale + rtol * |e|`` anywhere.

    ``scale = max(1, max |e|)``: fp32 rounding grows with the tensor's magnitude (random-init ResNet-50
    logits reach ~100 and torch fp32 alone differs from fp64 by ~5e-5 on the near-zero ones).
    """
    if actual.shape != expected.shape:
        raise ExportError(
            f"{where}: onnxruntime returned shape {tuple(actual.shape)} but PyTorch {tuple(expected.shape)}; "
            "the export baked in a shape (try dynamic_batch=False or exporter='dynamo')"
        )
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf
        diff = np.where((a == e) | (np.isnan(a) & np.isnan(e)), 0.0, np.abs(a - e))
    max_diff = float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
    finite = np.abs(e[np.isfinite(e)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    if not np.isclose(a, e, rtol=rtol, atol=atol * scale, equal_nan=True).all():
        raise ExportError(
            f"{where}: ONNX differs from PyTorch, max abs diff {max_diff:.3g} exceeds tolerance "
            f"(rtol={rtol:g}, atol={atol:g} x scale {scale:.3g}); the exported graph does not compute what "
            "the model does — try the other exporter (exporter='dynamo'/'torchscript') or report the op"
        )
    return max_diff


def check_onnx(path: str | os.PathLike[str], model: nn.Module, inputs_list: Sequence[Sequence[torch.Tensor]],
               rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Compare an ONNX file run by onnxruntime (graph optimisations off) with the PyTorch model.

    Every flattened output is compared with ``np.isclose(ort, torch, rtol, atol * max(1, max|torch|))``.
    The model runs in eval mode under ``torch.no_grad``; its training flags are restored.

    Args:
        path: The ``.onnx`` file (external data, if any, next to it).
        model: The reference model.
        inputs_list: Input tuples to check; ONNX inputs are matched by the ``input_<i>`` names
            :func:`export_onnx` gives, else by position.
        rtol: Relative tolerance.
        atol: Absolute tolerance.

    Returns:
        The largest absolute difference seen.

    Raises:
        ExportError: If onnxruntime cannot load or run the model, or an output differs (the message
            names the check input and output index, the max abs diff and the tolerance).
    """
    import onnxruntime as ort

    options = ort_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {os.fspath(path)!r}: {e}; re-export the model") from e
    onnx_inputs = [i.name for i in session.get_inputs()]
    worst = 0.0
    with eval_mode(model), torch.no_grad():
        for k, inputs in enumerate(inputs_list):
            inputs = tuple(inputs)
            flat = input_tensors(inputs)
            source = {f"input_{i}": x for i, x in enumerate(flat)}
            if not set(onnx_inputs) <= source.keys():  # not named by export_onnx: match by position
                if len(onnx_inputs) != len(flat):
                    raise ExportError(f"ONNX model takes inputs {onnx_inputs}, got {len(flat)} tensors")
                source = dict(zip(onnx_inputs, flat, strict=True))
            feed = {name: source[name].detach().cpu().numpy() for name in onnx_inputs}
            with kept_buffers(model):  # each check from the exported state (the file holds no update)
                expected = [t.detach().cpu().numpy() for t in flatten_outputs(model(*inputs))]
            try:
                actual = session.run(None, feed)
            except Exception as e:
                raise ExportError(
                    f"onnxruntime failed on check input {k} (shapes {[tuple(x.shape) for x in flat]}): {e}; "
                    "the export may have baked in the example batch size (try dynamic_batch=False)"
                ) from e
            if len(actual) != len(expected):
                raise ExportError(f"ONNX model has {len(actual)} outputs but PyTorch returns {len(expected)}")
            for j, (got, ref) in enumerate(zip(actual, expected, strict=True)):
                worst = max(
                    worst, _compare(np.asarray(got), ref, rtol, atol, f"output {j} on check input {k}")
                )
    return worst
