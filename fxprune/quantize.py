"""Post-training int8 quantisation of an exported ONNX file with onnxruntime, and how much it costs.

Two modes:

- ``"int8"``: static quantisation (``quantize_static``): weights and activations int8, activation ranges
  calibrated (MinMax) on seeded random inputs or on the inputs you pass. Weights per output channel by
  default (it keeps convolutions accurate). QDQ format by default; QOperator selectable.
- ``"int8-dynamic"``: dynamic quantisation (``quantize_dynamic``): weights int8, activation ranges computed
  at run time. No calibration; suited to Linear/MatMul-heavy models (MLPs, transformers).

The report compares the int8 file with the fp32 one on the calibration inputs: file size, onnxruntime
latency (median) and top-1 agreement of output 0 (argmax over its last axis). With random weights and random
inputs a classifier often predicts the same class for every input, which makes top-1 agreement trivially
high, so the report also gives the number of distinct fp32 top-1 classes and the logits' SQNR in dB.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxprune.errors import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["QUANT_FORMATS", "QUANT_MODES", "QuantizationError", "QuantReport", "ort_latency", "quantize_onnx", "random_feeds"]

QUANT_MODES = ("int8", "int8-dynamic")
QUANT_FORMATS = ("qdq", "qoperator")
Feed = dict[str, np.ndarray]



@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_onnx` wrote and how it compares with the fp32 model.

    Attributes:
        path: The int8 ``.onnx`` file.
        mode: ``"int8"`` (static) or ``"int8-dynamic"``.
        quant_format: ``"qdq"`` or ``"qoperator"`` (static mode), ``"dynamic"`` otherwise.
        per_channel: Whether weights were quantised per output channel.
        bytes_fp32: Size of the fp32 file.
        bytes_int8: Size of the int8 file.
        size_ratio: ``bytes_int8 / bytes_fp32``.
        n_samples: Calibration (and comparison) inputs.
        seed: Seed of the random inputs (None when the caller gave them).
        top1_agreement: Fraction of rows of output 0 whose argmax matches the fp32 model.
        distinct_top1_fp32: Distinct fp32 argmax values; 1 means the agreement says little.
        sqnr_db: ``10 log10(sum fp32^2 / sum (fp32 - int8)^2)`` over output 0.
        latency_fp32_ms: Median onnxruntime latency of the fp32 file on one input.
        latency_int8_ms: Same for the int8 file.
        threads: onnxruntime intra-op threads used for timing.
        runs: Timed runs per model.
    """

    path: str
    mode: str
    quant_format: str
    per_channel: bool
    bytes_fp32: int
    bytes_int8: int
    size_ratio: float
    n_samples: int
    seed: int | None
    top1_agreement: float
    distinct_top1_fp32: int
    sqnr_db: float
    latency_fp32_ms: float
    latency_int8_ms: float
    threads: int
    runs: int

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def _session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QuantizationError(f"onnxruntime cannot load {os.fspath(path)}: {e}") from e


_NP_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def random_feeds(
    path: str | os.PathLike[str], n: int, *, seed: int = 0, shapes: Sequence[Sequence[int]] | None = None
) -> list[Feed]:
    """Seeded standard-normal inputs for an ONNX model, ``n`` feeds of batch 1.

    Args:
        path: The ONNX file (its input names, types and shapes are read from it).
        n: Number of feeds.
        seed: Seed of the NumPy generator.
        shapes: Input shapes, one per ONNX input; by default the file's, with symbolic dims set to 1.

    Raises:
        QuantizationError: If an input is not floating point or has a symbolic non-batch dim and no shape.
    """
    inputs = _session(path).get_inputs()
    if shapes is not None and len(shapes) != len(inputs):
        raise QuantizationError(f"the ONNX model has {len(inputs)} inputs, got {len(shapes)} shapes")
    resolved: list[tuple[str, tuple[int, ...], type]] = []
    for i, info in enumerate(inputs):
        if info.type not in _NP_TYPES:
            raise QuantizationError(f"input {info.name} is {info.type}; random calibration needs float inputs")
        if shapes is not None:
            shape = tuple(int(d) for d in shapes[i])
        elif all(isinstance(d, int) for d in info.shape[1:]):
            shape = (1, *info.shape[1:])
        else:
            raise QuantizationError(f"input {info.name} has symbolic dims {info.shape}; give its shape")
        resolved.append((info.name, shape, _NP_TYPES[info.type]))
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(dtype) for name, shape, dtype in resolved} for _ in range(n)]


def ort_latency(path: str | os.PathLike[str], feed: Feed, *, runs: int = 20, warmup: int = 3, threads: int | None = None) -> tuple[float, int]:
    """Median onnxruntime CPU latency in ms (all graph optimisations on) and the intra-op threads used."""
    session = _session(path, threads)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    used = threads if threads is not None else int(session.get_session_options().intra_op_num_threads) or (os.cpu_count() or 1)
    return float(statistics.median(times)), used


class _Reader:
    """A ``CalibrationDataReader`` over a list of feeds (duck-typed: onnxruntime only calls ``get_next``)."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._it: Iterator[Feed] = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)


def _preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, fusion); fall back to ``src`` if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(os.fspath(src), os.fspath(dst))
        return dst
    except Exception as e:  # noqa: BLE001 - pre-processing is an optimisation, never a requirement
        log.warning("quantisation pre-processing failed (%s); quantising the model as exported", e)
        return src


def _outputs(path: Path, feeds: Sequence[Feed]) -> np.ndarray:
    session = _session(path)
    rows = [np.asarray(session.run(None, feed)[0], dtype=np.float64) for feed in feeds]
    return np.concatenate([r.reshape(-1, r.shape[-1]) if r.ndim else r.reshape(1, 1) for r in rows])


def _compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, int, float]:
    top_ref, top_got = ref.argmax(axis=-1), got.argmax(axis=-1)
    noise = float(((ref - got) ** 2).sum())
    sqnr = float("inf") if noise == 0 else 10 * float(np.log10(max(float((ref**2).sum()), 1e-30) / noise))
    return float((top_ref == top_got).mean()), len(np.unique(top_ref)), sqnr


def quantize_onnx(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mode: str = "int8",
    feeds: Sequence[Feed] | None = None,
    n_samples: int = 32,
    seed: int = 0,
    quant_format: str = "qdq",
    per_channel: bool | None = None,
    runs: int = 20,
    threads: int | None = None,
) -> QuantReport:
    """Quantise an fp32 ONNX file to int8 and compare the two on the calibration inputs.

    The file is staged in a temporary directory beside ``out_path`` and moved into place only when the
    int8 model loads and runs in onnxruntime, so a failure leaves nothing behind.

    Args:
        fp32_path: The fp32 model (e.g. from ``export_onnx``).
        out_path: Where to write the int8 model.
        mode: ``"int8"`` (static, calibrated) or ``"int8-dynamic"``.
        feeds: Calibration inputs (``{input name: array}``); default ``n_samples`` seeded random ones.
        n_samples: Number of random calibration inputs when ``feeds`` is None.
        seed: Seed of the random calibration inputs.
        quant_format: ``"qdq"`` or ``"qoperator"`` (static mode only).
        per_channel: Per-output-channel weights; default True for static and False for dynamic mode.
        runs: Timed runs per model for the latency medians.
        threads: onnxruntime intra-op threads for timing (default: onnxruntime's choice).

    Returns:
        The quantisation report.

    Raises:
        QuantizationError: On an unknown mode/format or a failure of onnxruntime.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in QUANT_MODES:
        raise QuantizationError(f"unknown quantisation mode {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if quant_format not in QUANT_FORMATS:
        raise QuantizationError(f"unknown quantisation format {quant_format!r}; choose one of {', '.join(QUANT_FORMATS)}")
    if feeds is None and n_samples < 1:
        raise QuantizationError(f"need at least one calibration sample, got {n_samples}")
    src, target = Path(fp32_path), Path(out_path)
    static = mode == "int8"
    per_channel = static if per_channel is None else per_channel
    given = feeds is not None
    feeds = list(feeds) if feeds is not None else random_feeds(src, n_samples, seed=seed)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        ready = _preprocess(src, stage / "pre.onnx")
        staged = stage / target.name
        try:
            if static:
                fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
                quantize_static(
                    os.fspath(ready), os.fspath(staged), _Reader(feeds), quant_format=fmt, per_channel=per_channel,
                    activation_type=QuantType.QInt8 if fmt == QuantFormat.QDQ else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                )
            else:
                quantize_dynamic(os.fspath(ready), os.fspath(staged), weight_type=QuantType.QInt8, per_channel=per_channel)
        except Exception as e:
            raise QuantizationError(f"onnxruntime {mode} quantisation failed: {type(e).__name__}: {e}") from e
        agreement, distinct, sqnr = _compare(_outputs(src, feeds), _outputs(staged, feeds))
        lat_fp32, used = ort_latency(src, feeds[0], runs=runs, threads=threads)
        lat_int8, _ = ort_latency(staged, feeds[0], runs=runs, threads=threads)
        os.replace(staged, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    bytes_fp32, bytes_int8 = src.stat().st_size, target.stat().st_size
    report = QuantReport(
        path=os.fspath(target), mode=mode, quant_format=quant_format if static else "dynamic",
        per_channel=per_channel, bytes_fp32=bytes_fp32, bytes_int8=bytes_int8, size_ratio=bytes_int8 / bytes_fp32,
        n_samples=len(feeds), seed=None if given else seed, top1_agreement=agreement,
        distinct_top1_fp32=distinct, sqnr_db=sqnr, latency_fp32_ms=lat_fp32, latency_int8_ms=lat_int8,
        threads=used, runs=runs,
    )
    if distinct == 1:
        log.info("the fp32 model predicts one class for every calibration input: top-1 agreement is trivial")
    log.info("quantised %s -> %s: %s", src, target, report)
    return report
