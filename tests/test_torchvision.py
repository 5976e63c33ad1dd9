"""The core issue's acceptance set: torchvision CNNs (random init) pruned at 0.5, proven, exported, checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxprune.passes.export import export_onnx
from tests.conftest import check_pruned

torchvision = pytest.importorskip("torchvision")

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "googlenet", "regnet_y_400mf"]


def _randomize_bn(model: torch.nn.Module) -> None:
    """Random running statistics, so the oracle also exercises BatchNorm slicing (init stats are 0/1)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_prune_oracle_onnx(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    _randomize_bn(model)
    x = (torch.randn(1, 3, 224, 224),)
    r = check_pruned(model, x, 0.5)
    assert r.params_after / r.params_before < 0.5
    report = export_onnx(r.model, x, tmp_path / f"{name}.onnx", n_check_inputs=1)
    assert (tmp_path / f"{name}.onnx").exists() and report.max_abs_diff <= 1e-3
    assert not list(tmp_path.glob("*.data"))
