"""One model per family of the coverage corpus (the full corpus is benchmarks/coverage.py, docs/coverage.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxprune.passes.export import export_onnx
from tests.conftest import check_pruned

TORCHVISION = ["shufflenet_v2_x0_5", "mobilenet_v3_small", "squeezenet1_1", "mnasnet0_5", "swin_t"]
TIMM = ["convnext_atto", "ghostnet_050", "levit_128s", "mobilevit_xxs", "poolformer_s12", "mixer_s16_224",
        "efficientformer_l1", "regnety_002", "repvgg_a0", "cspresnet50", "densenet121", "resnet18",
        "eva02_tiny_patch14_224"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_family(name: str, tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(1, 3, 224, 224),)
    r = check_pruned(model, x, 0.5)  # Swin too: LayerNorm over pruned channels is proven exactly
    if name == "shufflenet_v2_x0_5":
        assert export_onnx(r.model, x, tmp_path / "m.onnx", n_check_inputs=1).max_abs_diff < 1e-3


@pytest.mark.parametrize("name", TIMM)
def test_timm_family(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    r = check_pruned(model, (torch.randn(1, *size),), 0.5)
    assert r.oracle is not None and r.oracle.applicable and r.oracle.passed, r.oracle
