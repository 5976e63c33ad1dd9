"""ONNX export: single verified file, both exporters, opsets, GraphModules, failures leave nothing."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import fxprune.passes.export as export_mod
import fxprune.passes.onnx_check as onnx_check
from fxprune.errors import ExportError
from fxprune.passes.export import ExportReport, check_onnx, export_onnx, make_check_inputs


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, self.fc(y.mean((2, 3)))


class BakedBatch(nn.Module):
    """Tracing turns ``int(x.shape[0])`` into a constant, so batch 2 breaks the dynamic-batch export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(int(x.shape[0]), -1))


X = torch.randn(1, 3, 16, 16)


def _ort(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def _break_torchscript(monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod._call_exporter

    def call(name: str, *args: object, **kwargs: object) -> None:
        if name == "torchscript":
            raise RuntimeError("legacy exporter broken")
        real(name, *args, **kwargs)

    monkeypatch.setattr(export_mod, "_call_exporter", call)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_convnet_single_file_verified_and_model_untouched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvNet().train()
    model.bn.eval()  # mixed training flags must come back exactly
    before = _state(model)
    path = tmp_path / "net.onnx"
    report = export_onnx(model, (X,), path)
    assert isinstance(report, ExportReport)
    assert os.listdir(tmp_path) == ["net.onnx"]  # no .data, no leftover staging directory
    assert report.path == str(path) and report.opset == 18 and report.exporter == "torchscript"
    assert report.simplified and report.n_checked_inputs == 3
    assert 0 < report.nodes_after_simplify <= report.nodes_before_simplify
    assert report.bytes_before_simplify > 0 and report.bytes_after_simplify == path.stat().st_size
    assert 0.0 <= report.max_abs_diff < 1e-4
    assert model.training and not model.bn.training and model.conv1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Dynamic batch on input and output; ORT agrees with torch at batch 4.
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param
    x4 = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x4)
    np.testing.assert_allclose(_ort(path, x4)[0], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_tuple_output(tmp_path: Path) -> None:
    model = TupleNet()
    report = export_onnx(model, (X,), tmp_path / "tup.onnx")
    assert os.listdir(tmp_path) == ["tup.onnx"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model.eval()(x)
    got = _ort(tmp_path / "tup.onnx", x)
    assert len(got) == 2 and report.n_checked_inputs == 3
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_opsets(tmp_path: Path, opset: int) -> None:
    report = export_onnx(ConvNet(), (X,), tmp_path / "m.onnx", opset=opset)
    assert report.opset == opset
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]


def test_graph_module_both_exporters(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(ConvNet())
    ts = export_onnx(gm, (X,), tmp_path / "ts.onnx")
    dy = export_onnx(gm, (X,), tmp_path / "dy.onnx", exporter="dynamo", n_check_inputs=2)
    assert (ts.exporter, dy.exporter) == ("torchscript", "dynamo")
    assert dy.opset == 18 and dy.max_abs_diff < 1e-4
    assert sorted(os.listdir(tmp_path)) == ["dy.onnx", "ts.onnx"]


def test_auto_falls_back_to_dynamo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _break_torchscript(monkeypatch)
    report = export_onnx(TupleNet(), (X,), tmp_path / "fb.onnx", n_check_inputs=2)
    assert report.exporter == "dynamo" and report.n_checked_inputs == 2
    assert os.listdir(tmp_path) == ["fb.onnx"]


def test_dynamo_wrong_opset_is_an_error_and_all_exporters_failing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_torchscript(monkeypatch)
    # dynamo cannot down-convert a Conv/BatchNorm net to opset 13; it must not pass silently as 18.
    with pytest.raises(ExportError, match="opset") as info:
        export_onnx(ConvNet(), (X,), tmp_path / "x.onnx", opset=13)
    assert "torchscript: RuntimeError: legacy exporter broken" in str(info.value)
    assert info.value.__cause__ is not None
    assert os.listdir(tmp_path) == []


def test_check_onnx_detects_other_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "a.onnx"
    export_onnx(ConvNet(), (X,), path)
    inputs = make_check_inputs((X,), 2, dynamic_batch=True)
    with pytest.raises(
        ExportError, match=r"output 0 .*max abs diff .*exceeds tolerance \(rtol=0.0001, atol=1e-05 x scale"
    ):
        check_onnx(path, ConvNet(), inputs, rtol=1e-4, atol=1e-5)


def test_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_check(*args: object, **kwargs: object) -> float:
        raise ExportError("output 0 differs")

    monkeypatch.setattr(export_mod, "check_onnx", failing_check)
    with pytest.raises(ExportError, match="output 0"):
        export_onnx(ConvNet(), (X,), tmp_path / "bad.onnx")
    assert os.listdir(tmp_path) == []


def test_baked_batch_is_caught_by_batch_2_check(tmp_path: Path) -> None:
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ExportError, match="check input 1"):
        export_onnx(BakedBatch(), (x,), tmp_path / "baked.onnx")
    assert os.listdir(tmp_path) == []
    report = export_onnx(BakedBatch(), (x,), tmp_path / "static.onnx", dynamic_batch=False)
    assert report.n_checked_inputs == 3
    proto = onnx.load(str(tmp_path / "static.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_no_simplify_no_check_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    path.write_bytes(b"old")
    report = export_onnx(ConvNet(), (X,), path, simplify=False, check=False)
    assert not report.simplified and report.nodes_after_simplify == report.nodes_before_simplify
    assert report.n_checked_inputs == 0 and math.isnan(report.max_abs_diff)
    onnx.checker.check_model(str(path))


def test_large_model_path_writes_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    model = ConvNet()
    report = export_onnx(model, (X,), tmp_path / "big.onnx", n_check_inputs=1)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert not report.simplified and report.max_abs_diff < 1e-4
    with torch.no_grad():
        ref = model.eval()(X)
    np.testing.assert_allclose(_ort(tmp_path / "big.onnx", X)[0], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(ConvNet(), (X,), tmp_path / "m.onnx", exporter="tvm")
    with pytest.raises(ExportError, match="does not run"):
        export_onnx(ConvNet(), (torch.randn(1, 5, 16, 16),), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_check_inputs_are_seeded_and_batched() -> None:
    ex = (torch.randn(4, 3, 8, 8), torch.tensor([[3, 7]]))
    a = make_check_inputs(ex, 3, dynamic_batch=True, seed=1)
    b = make_check_inputs(ex, 3, dynamic_batch=True, seed=1)
    assert [t[0].shape[0] for t in a] == [1, 2, 1]
    assert all(torch.equal(x, y) for ta, tb in zip(a, b, strict=True) for x, y in zip(ta, tb, strict=True))
    assert all(int(t[1].min()) >= 3 and int(t[1].max()) <= 7 and t[1].dtype == torch.int64 for t in a)
    static = make_check_inputs(ex, 2, dynamic_batch=False)
    assert all(t[0].shape == ex[0].shape for t in static)


def test_tolerance_scales_with_output_magnitude() -> None:
    ref = np.array([100.0, 0.001, -50.0], dtype=np.float32)
    noisy = ref + np.array([0.0, 5e-5, 0.0], dtype=np.float32)  # fp32 noise at the scale of 100
    assert onnx_check._compare(noisy, ref, 1e-4, 1e-5, "out") == pytest.approx(5e-5, rel=1e-2)
    wrong = ref + np.array([0.0, 0.05, 0.0], dtype=np.float32)  # a real error still fails
    with pytest.raises(ExportError, match="out: .*max abs diff 0.05"):
        onnx_check._compare(wrong, ref, 1e-4, 1e-5, "out")
    with pytest.raises(ExportError, match="max abs diff 2e-05"):  # unit-scale outputs keep atol 1e-5
        onnx_check._compare(np.array([0.5, 2e-5]), np.array([0.5, 0.0]), 1e-4, 1e-5, "out")
    nan_inf = np.array([np.nan, np.inf, 1.0])
    assert onnx_check._compare(nan_inf, nan_inf.copy(), 1e-4, 1e-5, "out") == 0.0
    assert onnx_check._compare(np.zeros((0, 3)), np.zeros((0, 3)), 1e-4, 1e-5, "out") == 0.0
    with pytest.raises(ExportError, match="shape"):
        onnx_check._compare(np.zeros((1, 3)), np.zeros((2, 3)), 1e-4, 1e-5, "out")


def test_onnxslim_is_the_alternative_simplifier(tmp_path: Path) -> None:
    pytest.importorskip("onnxslim")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    report = export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", simplify="onnxslim")
    assert report.simplified and report.max_abs_diff < 1e-4 and (tmp_path / "m.onnx").exists()


class _ListInput(nn.Module):
    """A detector-style forward: a list of images of different sizes, one output per image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.conv(img.unsqueeze(0)).mean((2, 3)) for img in images]


def test_list_of_tensors_input_gives_one_onnx_input_per_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = [torch.randn(3, 16, 16), torch.randn(3, 12, 20)]
    report = export_onnx(_ListInput().eval(), (images,), tmp_path / "list.onnx", dynamic_batch=False, n_check_inputs=2)
    assert report.max_abs_diff < 1e-5
    assert [i.name for i in onnx.load(report.path).graph.input] == ["input_0", "input_1"]
    with pytest.raises(ExportError, match="lists of tensors"):
        export_onnx(_ListInput().eval(), ([],), tmp_path / "empty.onnx")
