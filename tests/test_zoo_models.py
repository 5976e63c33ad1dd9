"""Tests for the seeded, fx-traceable model zoo in ``models_zoo``."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import models_zoo
from models_zoo import ZOO, ZooEntry, get, names

EXPECTED_NAMES = {
    "resnet_basic",
    "resnet_bottleneck",
    "resnet18",
    "mobilenet_v2",
    "densenet",
    "yolo_block",
    "se_net",
    "unet",
    "flatten_linear",
    "flatten_linear_fn",
    "resnext",
    "mlp",
}


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Normalise a model output to a tuple of tensors."""
    return out if isinstance(out, tuple) else (out,)


@cache
def _built(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Build ``name`` with seed 0 once and cache the model, inputs and eager output."""
    model, inputs = get(name)
    with torch.no_grad():
        out = _as_tuple(model(*inputs))
    return model, inputs, out


def test_registry_contents() -> None:
    assert set(names()) == EXPECTED_NAMES
    assert names() == list(ZOO)
    for key, entry in ZOO.items():
        assert isinstance(entry, ZooEntry)
        assert entry.name == key
        assert callable(entry.build)
        assert entry.description
        assert all(isinstance(d, int) and d > 0 for d in entry.input_shape)
    assert ZOO["resnet18"].input_shape == (1, 3, 224, 224)
    assert ZOO["mlp"].input_shape == (1, 64)
    assert ZOO["unet"].input_shape == (1, 3, 32, 32)


def test_unknown_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="resnet_basic") as info:
        get("no_such_model")
    assert "no_such_model" in str(info.value)
    assert all(n in str(info.value) for n in names())


def test_zoo_entry_is_frozen() -> None:
    with pytest.raises(AttributeError):
        ZOO["mlp"].name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_eval_mode_and_inputs(name: str) -> None:
    model, inputs, _ = _built(name)
    assert isinstance(model, nn.Module)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert isinstance(inputs, tuple) and len(inputs) == 1
    assert tuple(inputs[0].shape) == ZOO[name].input_shape
    assert inputs[0].dtype == torch.float32


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_is_finite(name: str) -> None:
    _, _, out = _built(name)
    assert len(out) >= 1
    for t in out:
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
        assert t.abs().max() < 1e3
        assert t.std() > 0


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_symbolic_trace_matches_eager(name: str) -> None:
    model, inputs, out = _built(name)
    gm = torch.fx.symbolic_trace(model)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        traced = _as_tuple(gm(*inputs))
    assert len(traced) == len(out)
    for a, b in zip(traced, out, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_seed_determinism(name: str) -> None:
    model, inputs, _ = _built(name)
    again, inputs_again = get(name, seed=0)
    other, inputs_other = get(name, seed=1)
    sd, sd_again, sd_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert sd.keys() == sd_again.keys() == sd_other.keys()
    for key, value in sd.items():
        assert torch.equal(value, sd_again[key]), key
        if value.is_floating_point():
            assert not torch.equal(value, sd_other[key]), key
    assert torch.equal(inputs[0], inputs_again[0])
    assert not torch.equal(inputs[0], inputs_other[0])


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_batchnorm_stats_are_nontrivial(name: str) -> None:
    model, _, _ = _built(name)
    for bn in (m for m in model.modules() if isinstance(m, _BatchNorm)):
        assert bn.running_var is not None and bn.running_mean is not None
        assert (bn.running_var > 0).all()
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert not torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_expected_graph_patterns() -> None:
    """Spot-check that the ops the pruner must handle appear in the traced graphs."""

    def targets(name: str) -> set[str]:
        gm = torch.fx.symbolic_trace(_built(name)[0])
        return {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes}

    assert {"cat", "split", "chunk", "getitem"} <= targets("yolo_block")
    assert {"mean", "view", "sigmoid", "mul"} <= targets("se_net")
    assert {"cat", "interpolate"} <= targets("unet")
    assert "view" in targets("flatten_linear")
    assert "flatten" in targets("flatten_linear_fn")
    depthwise = [
        m
        for m in _built("mobilenet_v2")[0].modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
    ]
    assert depthwise
    grouped = [m for m in _built("resnext")[0].modules() if isinstance(m, nn.Conv2d) and m.groups == 4]
    assert grouped and all(m.in_channels // m.groups == 8 for m in grouped)


def test_outputs_shapes() -> None:
    assert _built("resnet18")[2][0].shape == (1, 1000)
    assert _built("unet")[2][0].shape == (1, 2, 32, 32)
    assert [t.shape for t in _built("yolo_block")[2]] == [(1, 18, 8, 8), (1, 18, 4, 4)]
    assert _built("mlp")[2][0].shape == (1, 10)
    assert models_zoo.get("mlp", seed=3)[0](torch.zeros(2, 64)).shape == (2, 10)
