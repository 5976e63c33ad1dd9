"""onnxruntime int8 quantisation of pruned models: size, agreement with fp32, clean failures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import fxprune
import models_zoo
from fxprune.passes.export import export_onnx
from fxprune.quantize import QuantizationError, quantize_onnx, random_feeds

log = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_onnx(name: str, path: Path) -> Path:
    model, inputs = models_zoo.get(name)
    result = fxprune.prune(model, 0.5, example_inputs=inputs)
    export_onnx(result.model, inputs, path, n_check_inputs=1)
    return path


def test_int8_static_resnet18_criterion(tmp_path: Path) -> None:
    """The issue's criterion: int8 <= 30% of the fp32 pruned file, top-1 agreement >= 95% on calibration inputs."""
    fp32 = _pruned_onnx("resnet18", tmp_path / "r18.onnx")
    q = quantize_onnx(fp32, tmp_path / "r18.int8.onnx", mode="int8", n_samples=32, seed=0, runs=3, threads=1)
    log.warning("resnet18 int8: %s", q)
    assert Path(q.path).stat().st_size == q.bytes_int8
    assert q.bytes_fp32 == fp32.stat().st_size
    assert q.size_ratio <= 0.30
    assert q.top1_agreement >= 0.95
    # random weights: every calibration input gets the same class, so the SQNR is what shows int8 is close
    assert q.sqnr_db > 25.0
    assert q.quant_format == "qdq" and q.per_channel and q.n_samples == 32 and q.threads == 1
    assert q.latency_fp32_ms > 0 and q.latency_int8_ms > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_int8_dynamic_mlp_keeps_predictions(tmp_path: Path) -> None:
    fp32 = _pruned_onnx("mlp", tmp_path / "mlp.onnx")
    q = quantize_onnx(fp32, tmp_path / "mlp.int8.onnx", mode="int8-dynamic", n_samples=64, runs=3, threads=1)
    assert q.quant_format == "dynamic" and not q.per_channel
    assert q.size_ratio < 0.5
    assert q.distinct_top1_fp32 > 1  # the MLP's predictions depend on the input: agreement is meaningful here
    assert q.top1_agreement >= 0.9


def test_qoperator_per_tensor_format(tmp_path: Path) -> None:
    fp32 = _pruned_onnx("resnet_basic", tmp_path / "rb.onnx")
    q = quantize_onnx(fp32, tmp_path / "rb.int8.onnx", quant_format="qoperator", per_channel=False, n_samples=8,
                      runs=1, threads=1)
    assert q.quant_format == "qoperator" and not q.per_channel and q.bytes_int8 < q.bytes_fp32
    assert q.top1_agreement >= 0.9


def test_random_feeds_are_seeded_and_shaped(tmp_path: Path) -> None:
    fp32 = _pruned_onnx("resnet_basic", tmp_path / "rb.onnx")
    a, b = random_feeds(fp32, 3, seed=1), random_feeds(fp32, 3, seed=1)
    assert len(a) == 3 and list(a[0]) == ["input_0"] and a[0]["input_0"].shape == (1, 3, 32, 32)
    assert all(np.array_equal(x["input_0"], y["input_0"]) for x, y in zip(a, b, strict=True))
    assert random_feeds(fp32, 1, shapes=[(4, 3, 32, 32)])[0]["input_0"].shape == (4, 3, 32, 32)


def test_given_feeds_are_used(tmp_path: Path) -> None:
    fp32 = _pruned_onnx("resnet_basic", tmp_path / "rb.onnx")
    feeds = random_feeds(fp32, 5, seed=3)
    q = quantize_onnx(fp32, tmp_path / "rb.int8.onnx", feeds=feeds, runs=1, threads=1)
    assert q.n_samples == 5 and q.seed is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "int4"}, "unknown quantisation mode"),
    ({"quant_format": "fancy"}, "unknown quantisation format"),
    ({"n_samples": 0}, "at least one calibration sample"),
])
def test_bad_arguments_raise_and_write_nothing(kwargs: dict[str, object], match: str, tmp_path: Path) -> None:
    fp32 = _pruned_onnx("mlp", tmp_path / "mlp.onnx")
    with pytest.raises(QuantizationError, match=match):
        quantize_onnx(fp32, tmp_path / "out.int8.onnx", **kwargs)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_unreadable_model_raises_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(QuantizationError, match="cannot load"):
        quantize_onnx(bad, tmp_path / "bad.int8.onnx", n_samples=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
