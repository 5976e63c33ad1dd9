"""torchvision Swin / Swin-V2: shifted_window_attention lowered to graph ops with exact rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes.export import export_onnx
from fxprune.passes.window_ops import window_mask, window_partition, window_reverse
from tests.conftest import check_pruned

swin = pytest.importorskip("torchvision.models.swin_transformer")


def _tiny(v2: bool = False) -> nn.Module:
    """Two stages (a shifted block in each, a patch merging between), window 4, on 32x32 inputs."""
    torch.manual_seed(0)
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                                num_classes=10, **extra).eval()


def _attention_calls(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is swin.shifted_window_attention]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("prune_heads", [False, True])
def test_window_attention_is_pruned_exactly(v2: bool, prune_heads: bool) -> None:
    """Residual stream pinned (LayerNorm): the oracle is exact through windows, shift masks and heads."""
    x = (torch.randn(2, 3, 32, 32),)
    r = check_pruned(_tiny(v2), x, 0.5, prune_heads=prune_heads, ignore=[nn.LayerNorm], importance="random")
    assert not _attention_calls(r.model)
    attn = r.model.get_submodule("features.1.1.attn")
    assert attn.qkv.weight.shape == (3 * 8, 16) and attn.proj.weight.shape == (16, 8)  # inner 16 -> 8
    heads = 1 if (prune_heads or v2) else 2  # V2's per-head position MLP makes heads the channels
    assert f", 3, {heads}, {8 // heads})" in r.model.code
    table = r.model.get_submodule("features.1.1.attn.cpb_mlp.2" if v2 else "features.1.1.attn")
    assert (table.weight.shape[0] if v2 else table.relative_position_bias_table.shape[1]) == heads


@pytest.mark.parametrize("v2", [False, True])
def test_swin_whole_model_shrinks_runs_at_other_sizes_and_exports(v2: bool, tmp_path: Path) -> None:
    model = _tiny(v2)
    x = (torch.randn(1, 3, 32, 32),)
    r = check_pruned(model, x, 0.5)  # the residual stream too (LayerNorm over kept channels: exact)
    assert r.params_after / r.params_before < 0.35
    with torch.no_grad():  # not specialised to the example size: H, W are read at run time
        assert r.model(torch.randn(1, 3, 48, 40)).shape == (1, 10)
    torch.save(r.model, tmp_path / "swin.pt")  # the window ops stay wrapped when the GraphModule is reloaded
    back = torch.load(tmp_path / "swin.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(*x), r.model(*x))
    report = export_onnx(r.model, x, tmp_path / "swin.onnx", n_check_inputs=1)
    assert report.max_abs_diff < 1e-3


def test_swin_module_output_keeps_attention_whole() -> None:
    """torchvision's own forward reads the head dim from its input width: output='module' keeps it whole."""
    model = _tiny()
    x = (torch.randn(1, 3, 32, 32),)
    r = fxprune.prune(model, 0.5, example_inputs=x, output="module")
    assert isinstance(r.model, swin.SwinTransformer) and r.params_after < r.params_before
    with torch.no_grad():
        assert r.model(*x).shape == (1, 10)


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (4, 4)])
def test_window_ops_round_trip_and_mask_match_torchvision(size: tuple[int, int]) -> None:
    """partition then reverse is the identity (with padding and shift); the ops equal torchvision's function."""
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(2, h, w, 6)
    window, shift = [4, 4], [2, 2]
    assert torch.equal(window_reverse(window_partition(x, window, shift), h, w, window, shift), x)
    qkv, proj = nn.Linear(6, 18), nn.Linear(6, 6)
    bias = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        want = swin.shifted_window_attention(x, qkv.weight, proj.weight, bias, window, 2, shift,
                                             qkv_bias=qkv.bias, proj_bias=proj.bias, training=False)
        xw = window_partition(x, window, shift)
        q, k, v = qkv(xw).reshape(xw.shape[0], 16, 3, 2, 3).permute(2, 0, 3, 1, 4)
        attn = window_mask((q * 3**-0.5) @ k.transpose(-2, -1) + bias, h, w, window, shift).softmax(-1)
        got = window_reverse(proj((attn @ v).transpose(1, 2).reshape(xw.shape[0], 16, 6)), h, w, window, shift)
    torch.testing.assert_close(got, want)


class _PatchMerge(nn.Module):
    """conv -> channels-last -> torchvision's _patch_merging_pad (odd H/W: padded) -> Linear reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.reduction = nn.Linear(4 * 6, 5)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        return self.reduction(swin._patch_merging_pad(y))


def test_patch_merging_pad_couples_its_four_channel_copies_exactly() -> None:
    r = check_pruned(_PatchMerge().eval(), (torch.randn(2, 3, 7, 9),), 0.5, importance="random")
    assert r.model.get_submodule("conv").out_channels == 3
    assert r.model.get_submodule("reduction").in_features == 4 * 3  # the same 3 channels in every copy
