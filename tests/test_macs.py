"""MAC parity: the shape-only count that budgets use equals torch's FlopCounterMode / 2 on real graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
import models_zoo
from fxprune.metrics import count_macs


class Functional(nn.Module):
    """Every op family the counter knows, written functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.1)
        self.wt = nn.Parameter(torch.randn(16, 8, 2, 2) * 0.1)
        self.wg = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.1)
        self.proj = nn.Parameter(torch.randn(8, 24) * 0.1)  # Conv1D layout: [in, out]
        self.bias = nn.Parameter(torch.zeros(24))
        self.mix = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, None, 1, 1)  # (2, 16, 8, 8)
        y = F.conv_transpose2d(y, self.wt, stride=2)  # (2, 8, 16, 16)
        y = F.conv2d(y, self.wg, padding=1, groups=2)  # (2, 8, 16, 16)
        t = y.flatten(2).transpose(1, 2)  # (2, 256, 8)
        qkv = torch.addmm(self.bias, t.reshape(-1, 8), self.proj).view(2, 256, 24)
        q, k, v = qkv.split(8, dim=2)
        q, k, v = (a.view(2, 256, 2, 4).transpose(1, 2) for a in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)  # (2, 2, 256, 4)
        s = torch.baddbmm(torch.zeros(4, 256, 256), q.reshape(4, 256, 4), k.reshape(4, 256, 4).transpose(1, 2))
        a = a + torch.bmm(s.softmax(-1), v.reshape(4, 256, 4)).view(2, 2, 256, 4)
        a = a.transpose(1, 2).reshape(2, 256, 8)
        a = torch.einsum("bnc,cd->bnd", a, self.mix) + torch.matmul(a, self.mix)
        return self.lin(a).mean(1)


def _macs_of_plan(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    r = fxprune.prune(model, 0.0, example_inputs=(x,))
    return r.macs_before, count_macs(model, x)


def test_functional_ops_match_flop_counter() -> None:
    torch.manual_seed(0)
    predicted, measured = _macs_of_plan(Functional().eval(), torch.randn(2, 3, 8, 8))
    assert measured > 1_000_000
    assert predicted == measured


def test_pruned_prediction_matches_flop_counter() -> None:
    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(2, 3, 8, 8)
    r = fxprune.prune(model, 0.5, example_inputs=(x,))
    assert r.macs_after == count_macs(r.model, x) < r.macs_before


@pytest.mark.parametrize("name", models_zoo.names())
def test_zoo_models_match_flop_counter(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = models_zoo.get(name)
    r = fxprune.prune(model, 0.5, example_inputs=inputs)
    if r.parts:
        pytest.skip("pruned part by part: counted by FlopCounterMode already")
    assert r.macs_before == count_macs(model, inputs)
    assert r.macs_after == count_macs(r.model, inputs)


def test_multihead_attention_counted_in_eval_mode() -> None:
    """Eval-mode nn.MultiheadAttention takes a fused fast path with no flop formula; its MACs still count."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mha(x, x, x, need_weights=False)[0])

    model, x = Attn().eval(), torch.randn(2, 5, 16)
    r = fxprune.prune(model, 0.5, example_inputs=(x,))
    assert count_macs(model, x) == r.macs_before > 0  # the graph (MHA lowered) and the module agree
    assert count_macs(r.model, x) == r.macs_after < r.macs_before
