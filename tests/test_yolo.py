"""Stock Ultralytics YOLO (random init, built from the packaged yaml): pruned with no module substitution."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.metrics import count_macs

tasks = pytest.importorskip("ultralytics.nn.tasks")


# Fraction of parameters left at ratio 0.5, measured here. yolo11's PSA attention takes its split sizes
# from attributes in Python, so output="module" keeps that block whole (the graph output prunes it).
MODULE_LEFT = {"yolov8n.yaml": 0.34, "yolo11n.yaml": 0.42}


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml", "yolov8s.yaml", "yolo11s.yaml"])
def test_yolo_graph_output_reaches_a_third(cfg: str) -> None:
    torch.manual_seed(0)
    model = tasks.DetectionModel(cfg=cfg, verbose=False).eval()
    x = (torch.randn(1, 3, 320, 320),)
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True)
    assert r.params_after / r.params_before <= 0.33
    assert count_macs(r.model, x) / count_macs(model, x) <= 0.33
    assert r.macs_after / r.macs_before <= 0.33  # the result's own figures count opaque parts the same way
    with torch.no_grad():
        assert model(*x)[0].shape == r.model(*x)[0].shape


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_prunes_backbone_neck_and_head_branches(cfg: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tasks.DetectionModel(cfg=cfg, verbose=False).eval()
    x = (torch.randn(1, 3, 320, 320),)
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True, output="module")
    assert type(r.model) is type(model)  # Ultralytics' own classes, nothing substituted
    assert r.oracle is not None and r.oracle.passed
    # The Detect head's box and class branches shrink (traced with the model, or pruned as parts inside it).
    for branch in ("cv2", "cv3"):
        size = [sum(p.numel() for p in getattr(m.model[-1], branch).parameters()) for m in (model, r.model)]
        assert size[1] < size[0]
    assert r.params_after / r.params_before <= MODULE_LEFT[cfg]
    assert count_macs(r.model, x) / count_macs(model, x) <= MODULE_LEFT[cfg]
    with torch.no_grad():
        want, got = model(*x), r.model(*x)
    assert want[0].shape == got[0].shape
    # An Ultralytics-style checkpoint ({"model": module}) reloads in a fresh process.
    torch.save({"model": r.model}, tmp_path / "pruned.pt")
    torch.save(x, tmp_path / "x.pt")
    torch.save(got[0], tmp_path / "out.pt")
    script = textwrap.dedent(f"""
        import torch
        ckpt = torch.load(r"{tmp_path / 'pruned.pt'}", weights_only=False)
        m = ckpt["model"].float().eval()
        x = torch.load(r"{tmp_path / 'x.pt'}")
        with torch.no_grad():
            y = m(*x)[0]
        assert torch.allclose(y, torch.load(r"{tmp_path / 'out.pt'}"), atol=1e-5), (y - torch.load(r"{tmp_path / 'out.pt'}")).abs().max()
        print("reloaded", type(m).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reloaded DetectionModel" in proc.stdout


def test_prune_yolo_example_exports_matching_onnx(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "examples" / "prune_yolo.py"
    proc = subprocess.run([sys.executable, str(script), "--cfg", "yolov8n.yaml", "--imgsz", "320", "--runs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "yolov8n_pruned0.5.onnx").exists() and (tmp_path / "yolov8n_pruned0.5.pt").exists()
    assert "mask oracle (backbone+neck): passed" in proc.stdout
    # Ultralytics' own loader takes the checkpoint back and runs inference with it.
    check = (f"import numpy as np; from ultralytics import YOLO; y = YOLO(r'{tmp_path / 'yolov8n_pruned0.5.pt'}'); "
             "r = y.predict(np.zeros((320, 320, 3), dtype=np.uint8), imgsz=320, verbose=False); "
             "print(type(y.model).__name__, len(r))")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DetectionModel 1" in proc.stdout


def test_cli_yolo_loop_is_deployable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """From the command line: YOLO's own input size, a checkpoint YOLO(path) loads, one ONNX output."""
    import onnx
    from ultralytics import YOLO

    from fxprune.cli import main
    from fxprune.model_loader import load_model

    assert load_model("ultralytics:yolov8n.yaml").input_shapes == ((1, 3, 640, 640),)
    monkeypatch.chdir(tmp_path)
    code = main(["compile", "ultralytics:yolov8n.yaml", "--input-shape", "1,3,256,256", "--ratio", "0.5",
                 "--onnx", "y.onnx", "--save", "y.pt", "--runs", "0", "--no-verify"])
    assert code == 0, capsys.readouterr().err
    assert len(onnx.load(str(tmp_path / "y.onnx")).graph.output) == 1  # as `yolo export` gives
    yolo = YOLO(str(tmp_path / "y.pt"))
    assert type(yolo.model).__name__ == "DetectionModel"
    with torch.no_grad():
        out = yolo.model.eval()(torch.randn(1, 3, 256, 256))
    assert out[0].shape[1] == 84  # 4 box coordinates + 80 classes


def _tiny_dataset(root: Path, n: int = 8, size: int = 64) -> Path:
    """A detection data set in Ultralytics' layout: one red box per image, its label beside it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((size, size, 3), 40, np.uint8)
            x0, y0 = (int(v) for v in rng.integers(4, size // 2, 2))
            w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
            img[y0:y0 + h, x0:x0 + w] = (220, 60, 60)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            box = f"0 {(x0 + w / 2) / size:.4f} {(y0 + h / 2) / size:.4f} {w / size:.4f} {h / size:.4f}\n"
            (root / "labels" / split / f"{i}.txt").write_text(box)
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return yaml


def test_cli_prune_finetune_export_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """prune -> Ultralytics' trainer on the pruned model (widths kept) -> a checkpoint YOLO loads -> ONNX."""
    import onnxruntime as ort
    from ultralytics import YOLO

    from fxprune.cli import main

    data = _tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    code = main(["compile", "ultralytics:yolov8n.yaml", "--input-shape", "1,3,64,64", "--ratio", "0.5",
                 "--save", "pruned.pt", "--runs", "0", "--no-verify"])
    assert code == 0, capsys.readouterr().err
    pruned = YOLO("pruned.pt").model
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    code = main(["finetune-yolo", "pruned.pt", "--data", str(data), "--epochs", "1", "--imgsz", "64",
                 "--batch", "4", "--project", "runs", "--export", "onnx"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "has 1 classes, the pruned head 80" in err  # said, not silently trained as background
    weights = tmp_path / "runs" / "finetune" / "weights"
    trained = YOLO(str(weights / "last.pt")).model
    assert {k: v.shape for k, v in trained.state_dict().items()} == shapes  # the pruned widths survived training
    assert any(not torch.equal(trained.state_dict()[k].float(), v.float()) for k, v in pruned.state_dict().items()
               if k.endswith("conv.weight"))  # and the weights did train
    onnx_file = next(weights.glob("*.onnx"))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (pred,) = session.run(None, {session.get_inputs()[0].name: torch.randn(1, 3, 64, 64).numpy()})
    assert pred.shape[:2] == (1, 84)
