"""Attention and transformer blocks: head-dim pruning, contractions, LayerNorm, literal rewriting, ONNX."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.passes.export import export_onnx
from tests.conftest import check_pruned


class Attention(nn.Module):
    """A hand-written attention: fused qkv, literal head count and head dim, a chosen kernel."""

    def __init__(self, dim: int = 32, heads: int = 4, kernel: str = "matmul") -> None:
        super().__init__()
        self.heads, self.head_dim, self.kernel = heads, dim // heads, kernel
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.kernel == "einsum":
            attn = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.scale
            out = torch.einsum("bhnm,bhmd->bhnd", attn.softmax(-1), v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int = 32, kernel: str = "matmul") -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, kernel=kernel)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SeparateQKV(nn.Module):
    """q/k/v projections with grouped-query attention (2 kv heads shared by 4 query heads)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.d).transpose(1, 2)
        rep = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, rep, n, self.d).reshape(b, self.h, n, self.d)
        v = v[:, :, None].expand(b, self.kv, rep, n, self.d).reshape(b, self.h, n, self.d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, self.h * self.d))


@pytest.mark.parametrize("kernel", ["matmul", "sdpa", "einsum"])
def test_attention_head_dim_is_exact(kernel: str) -> None:
    """The residual stream is a model input (pinned), so LayerNorm is untouched: the oracle is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(kernel=kernel), Block(kernel=kernel)).eval()
    r = check_pruned(model, (torch.randn(2, 5, 32),), 0.5)
    qkv = r.model.get_submodule("0.attn.qkv")
    assert qkv.out_features == 3 * 4 * 4  # 4 heads of head_dim 8 -> 4
    assert r.model.get_submodule("0.fc1").out_features == 64


@pytest.mark.parametrize("kernel", ["matmul", "sdpa", "einsum"])
def test_prune_heads_removes_whole_heads_exactly(kernel: str) -> None:
    """prune_heads=True: 2 of 4 heads go, each head keeps its 8 dims; literals follow; the oracle is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(kernel=kernel), Block(kernel=kernel)).eval()
    r = check_pruned(model, (torch.randn(2, 5, 32),), 0.5, prune_heads=True)
    assert r.model.get_submodule("0.attn.qkv").out_features == 3 * 2 * 8
    assert ", 3, 2, 8)" in r.model.code and ", 3, 4, 4)" not in r.model.code
    assert r.plan.prune_heads


def test_prune_heads_with_grouped_query_attention() -> None:
    """Removing a kv head removes the query heads that share it."""
    torch.manual_seed(0)
    r = check_pruned(SeparateQKV().eval(), (torch.randn(1, 6, 32),), 0.5, prune_heads=True)
    assert r.model.get_submodule("q").out_features == 2 * 8 and r.model.get_submodule("k").out_features == 1 * 8


def test_prune_heads_plan_replays(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    x = (torch.randn(2, 5, 32),)
    r = fxprune.prune(model, 0.5, example_inputs=x, prune_heads=True)
    r.plan.save(tmp_path / "plan.json")
    replayed = fxprune.apply(model, str(tmp_path / "plan.json"), x)
    replayed.load_state_dict(r.model.state_dict())
    assert torch.equal(replayed(*x), r.model(*x))


def test_prune_heads_fixes_head_attributes_in_module_output() -> None:
    """output="module": the user's own attention module gets num_heads from the pruned width."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.head_dim = 4, 8
            self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.o(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    torch.manual_seed(0)
    x = (torch.randn(1, 5, 32),)
    r = fxprune.prune(Attn().eval(), 0.5, example_inputs=x, prune_heads=True, output="module", verify=True)
    assert (r.model.num_heads, r.model.head_dim) == (2, 8)
    assert r.model.q.out_features == 16 and r.model(*x).shape == (1, 5, 32)
    # Thinning heads changes sdpa's default scale 1/sqrt(head_dim): the graph keeps the original scale, the
    # user's forward cannot, and fxprune refuses to hand out the (wrong) module.
    with pytest.raises(fxprune.FxPruneError, match="disagrees"):
        fxprune.prune(Attn().eval(), 0.5, example_inputs=x, output="module")


def test_grouped_query_attention() -> None:
    torch.manual_seed(0)
    r = check_pruned(SeparateQKV().eval(), (torch.randn(1, 6, 32),), 0.5)
    assert r.model.get_submodule("q").out_features == 16 and r.model.get_submodule("k").out_features == 8


def test_residual_stream_through_layernorm_is_pruned() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.block, self.head = nn.Linear(16, 32), Block(), nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.block(self.embed(x)))

    torch.manual_seed(0)
    model = Net().eval()
    r = check_pruned(model, (torch.randn(2, 5, 16),), 0.5)
    assert r.oracle is not None and r.oracle.applicable and r.oracle.passed
    assert r.model.get_submodule("block.norm1").normalized_shape == (16,)
    assert r.model.get_submodule("embed").out_features == 16


class MHA(nn.Module):
    def __init__(self, mask: bool = False) -> None:
        super().__init__()
        self.mask = mask
        self.inp, self.mha, self.mlp = nn.Linear(8, 32), nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 8)
        self.register_buffer("causal", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False, attn_mask=self.causal if self.mask else None)
        return self.mlp(a)


@pytest.mark.parametrize("prune_heads", [False, True])
def test_multihead_attention_is_lowered_and_pruned(prune_heads: bool, tmp_path: Path) -> None:
    """nn.MultiheadAttention becomes linear/reshape/sdpa/linear in the graph: its inner width is pruned."""
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 8),)
    r = check_pruned(MHA().eval(), x, 0.5, prune_heads=prune_heads)
    mha = r.model.get_submodule("mha")
    assert mha.in_proj_weight.shape == (48, 16) and mha.out_proj.weight.shape == (16, 16)  # 32 -> 16 everywhere
    assert (", 3, 2, 8)" if prune_heads else ", 3, 4, 4)") in r.model.code
    assert set(r.model.state_dict()) == set(MHA().state_dict())
    report = export_onnx(r.model, x, tmp_path / "mha.onnx", n_check_inputs=2)
    assert report.max_abs_diff < 1e-4


def test_multihead_attention_with_a_mask_is_kept_with_a_reason() -> None:
    torch.manual_seed(0)
    analysis = fxprune.analyze(MHA(mask=True).eval(), torch.randn(1, 5, 8))
    assert any("MultiheadAttention" in g.reason for g in analysis.groups if not g.prunable)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_patch16_224"])
def test_timm_vit_heads_and_mlp_shrink(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2).eval()
    x = (torch.randn(1, 3, 224, 224),)
    r = check_pruned(model, x, 0.5, ignore=["patch_embed"])  # residual pinned: exact oracle
    assert r.model.get_submodule("blocks.0.attn.qkv").out_features == 3 * 384 // 2
    assert r.model.get_submodule("blocks.0.mlp.fc1").out_features == 1536 // 2
    full = check_pruned(model, x, 0.5)  # residual stream too (LayerNorm over kept channels: exact)
    assert full.params_after / full.params_before < 0.3
    report = export_onnx(full.model, x, tmp_path / "vit.onnx", n_check_inputs=1)
    assert report.max_abs_diff < 1e-3


def test_timm_vit_prune_heads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2).eval()
    x = (torch.randn(1, 3, 224, 224),)
    r = check_pruned(model, x, 0.5, ignore=["patch_embed"], prune_heads=True)  # residual pinned: exact oracle
    assert r.model.get_submodule("blocks.0.attn.qkv").out_features == 3 * 3 * 64  # 3 of 6 heads, 64 dims each
    assert ", 3, 3, 64)" in r.model.code
    report = export_onnx(r.model, x, tmp_path / "vit_heads.onnx", n_check_inputs=1)
    assert report.max_abs_diff < 1e-3


@pytest.mark.parametrize("prune_heads", [False, True])
def test_timm_swin_attention_shrinks(prune_heads: bool, tmp_path: Path) -> None:
    """Swin: padded windows, a gathered relative-position table and nn.Softmax no longer pin attention."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1)).eval()
    x = (torch.randn(1, 3, 224, 224),)
    r = check_pruned(model, x, 0.5, prune_heads=prune_heads)
    assert r.params_after / r.params_before < 0.3
    table = r.model.get_submodule("layers.0.blocks.0.attn").relative_position_bias_table
    assert table.shape[1] == (2 if prune_heads else 3)
    report = export_onnx(r.model, x, tmp_path / "swin.onnx", n_check_inputs=1)
    assert report.max_abs_diff < 1e-3


class ChunkedQKV(nn.Module):
    """torchvision MaxViT style: q, k, v = qkv.chunk(3, -1); q/k and v head dims are different groups."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("importance", ["l2", "random"])
def test_fused_qkv_chunk_thins_qk_and_v_evenly(importance: str) -> None:
    torch.manual_seed(0)
    r = check_pruned(ChunkedQKV().eval(), (torch.randn(1, 4, 16),), 0.5, importance=importance)
    assert r.model.get_submodule("qkv").out_features == 3 * 2 * 4


class TiedLM(nn.Module):
    """Token embedding and output projection share one weight (GPT-2 style), a LayerNorm-free block between."""

    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = Attention(dim, kernel="sdpa")
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.block(x)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


@pytest.mark.parametrize("prune_heads", [False, True])
def test_tied_input_output_embeddings_are_pruned_together(prune_heads: bool) -> None:
    """One weight, two users: the hidden dim shrinks in both at once, the vocabulary stays, the tie survives."""
    torch.manual_seed(0)
    r = check_pruned(TiedLM().eval(), (torch.randint(0, 50, (2, 7)),), 0.5, prune_heads=prune_heads)
    embed, head = r.model.get_submodule("embed"), r.model.get_submodule("head")
    assert embed.weight.shape == (50, 16) and head.weight is embed.weight
    assert head.in_features == 16 and head.out_features == 50
