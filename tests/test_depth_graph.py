"""Depth pruning of any traced model: residual units of the FX graph (``fxprune.depth_graph``), checked against
eager PyTorch with the removed blocks' branches zeroed by hooks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune import depth_graph
from fxprune.metrics import count_params


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Small convolutions run fastest on one thread (two threads on a shared core are 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IDENTITY_BLOCKS = ("layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1")  # resnet18's, no downsample


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zeroes the head: every output would be 0
    return vit


BATCHES = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]


def _zeroed(model: nn.Module, blocks: list[str]) -> nn.Module:
    """An eager copy of a torchvision ResNet whose ``blocks`` add zero to their shortcut (``bn2`` gives 0)."""
    other = copy.deepcopy(model)
    for name in blocks:
        other.get_submodule(name).bn2.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    return other


def _relative_loss(model: nn.Module, reference: nn.Module) -> float:
    """Mean squared difference to the reference's output relative to its mean square, averaged over BATCHES."""
    with torch.no_grad():
        pairs = [(model(x), reference(x)) for x in BATCHES]
    return sum(float((out - ref).pow(2).mean() / ref.pow(2).mean()) for out, ref in pairs) / len(pairs)


def test_units_are_the_identity_blocks() -> None:
    model = _resnet()
    r = fxprune.prune_depth(model, 0, calibration=BATCHES)
    assert isinstance(r, fxprune.GraphDepthResult) and r.blocks == "graph"
    assert r.units == IDENTITY_BLOCKS  # layer2.0, layer3.0, layer4.0 have a downsample shortcut
    assert r.removed == () and r.params_after == r.params_before and r.oracle.passed
    block, seen = copy.deepcopy(model), []  # the influence of layer3.1, eagerly: its input against bn2 + input
    block.layer3[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    block.layer3[1].bn2.register_forward_hook(lambda _m, _a, out: seen.append(out + seen[-1]))
    with torch.no_grad():
        for x in BATCHES:
            block(x)
    pairs = zip(seen[::2], seen[1::2], strict=True)  # per batch: (input, output), cosine over channels
    cos = torch.cat([torch.cosine_similarity(a.double(), b.double(), dim=1).flatten() for a, b in pairs])
    assert dict(r.influence)["layer3.1"] == pytest.approx(float((1 - cos).mean()), rel=1e-6)


def test_the_greedy_choice_is_the_eager_loss_argmin() -> None:
    model = _resnet()
    r = fxprune.prune_depth(model, 2, calibration=BATCHES)
    first = {b: _relative_loss(_zeroed(model, [b]), model) for b in IDENTITY_BLOCKS}  # each removal, eagerly
    assert r.removed[0] == min(first, key=first.get)
    assert dict(r.steps[0]) == pytest.approx(first, rel=1e-5)
    second = {b: _relative_loss(_zeroed(model, [r.removed[0], b]), model) for b in IDENTITY_BLOCKS if b != r.removed[0]}
    assert r.removed[1] == min(second, key=second.get)
    assert r.loss_before == 0.0 and r.loss_after == pytest.approx(second[r.removed[1]], rel=1e-5)


def test_the_result_is_the_model_with_the_branches_zeroed() -> None:
    model = _resnet()
    r = fxprune.prune_depth(model, 2, calibration=BATCHES)
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # a new input
    with torch.no_grad():
        got = copy.deepcopy(r.model).double()(x)
        want = _zeroed(model, list(r.removed)).double()(x)
    assert got.shape == (3, 10) and torch.allclose(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    gone = sum(count_params(model.get_submodule(b)) for b in r.removed)
    assert r.params_after == count_params(r.model) == r.params_before - gone
    names = {n for n, _ in r.model.named_modules()}
    assert not any(n.startswith(f"{b}.conv") for b in r.removed for n in names)
    assert r.oracle.passed and r.oracle.max_abs_diff <= 1e-9


def test_a_spoiled_removal_fails_the_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    def scaled(graph: Any, add: Any, shortcut: Any, copied: bool) -> Any:  # the shortcut, times 1.5
        with graph.inserting_before(add):
            return graph.call_function(torch.mul, (shortcut, 1.5))

    monkeypatch.setattr(depth_graph, "_shortcut_value", scaled)
    with pytest.raises(fxprune.InvariantError, match="depth oracle"):
        fxprune.prune_depth(_resnet(), 1, calibration=BATCHES)


def test_vit_encoder_blocks() -> None:
    vit = _vit()
    r = fxprune.prune_depth(vit, 2, calibration=BATCHES)
    assert r.units == tuple(f"encoder.layers.encoder_layer_{i}" for i in range(4))  # attention + MLP: one unit
    assert len(r.removed) == 2 and r.oracle.passed and r.oracle.max_abs_diff <= 1e-9
    per_block = count_params(vit.encoder.layers.encoder_layer_0)
    assert r.params_after == r.params_before - 2 * per_block
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    kept = [i for i in range(4) if f"encoder.layers.encoder_layer_{i}" not in r.removed]
    eager = copy.deepcopy(vit)
    eager.encoder.layers = nn.Sequential(*[eager.encoder.layers[i] for i in kept])  # a ViT block zeroed = gone
    with torch.no_grad():
        assert torch.allclose(r.model(x), eager(x), atol=1e-5)
        assert r.model(x).shape == (2, 10)


def test_blocks_graph_on_a_model_with_a_block_list() -> None:
    import models_zoo

    model, (x,) = models_zoo.get("resnet_basic")  # self.layers is an nn.ModuleList (of stages)
    r = fxprune.prune_depth(model, 1, calibration=[x], blocks="graph")
    assert r.units == ("layers.0.0", "layers.0.1", "layers.1.1") and r.oracle.passed


@pytest.mark.parametrize("remove", [5, 6, -1, "2"])
def test_bad_counts_are_argument_errors(remove: float) -> None:
    with pytest.raises(fxprune.ArgumentError, match="remove"):
        fxprune.prune_depth(_resnet(), remove, calibration=BATCHES)


def test_a_model_without_residual_adds_is_an_argument_error() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(fxprune.ArgumentError, match="Sequential has no residual unit"):
        fxprune.prune_depth(mlp, 1, calibration=BATCHES)


def test_batches_that_do_not_run_are_argument_errors() -> None:
    with pytest.raises(fxprune.ArgumentError, match="calibration batch 1"):
        fxprune.prune_depth(_resnet(), 1, calibration=[BATCHES[0], torch.randn(2, 5, 32, 32)])


def test_the_callers_model_is_never_run_or_written() -> None:
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[nn.Module] = []
    model.register_forward_pre_hook(lambda mod, _args: calls.append(mod))  # copied with the model: runs of the copy
    r = fxprune.prune_depth(model, 1, calibration=BATCHES)
    assert calls and all(m is not model for m in calls)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and r.model is not model
