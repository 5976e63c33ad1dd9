"""Metrics: unique parameter count, MACs against hand formulas, latency report and thread restore."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.metrics import LatencyReport, count_macs, count_params, eval_mode, measure_latency


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: the same Parameter object

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.emb(ids)))


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class MatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def test_count_params_tied_once() -> None:
    model = TiedLM()
    assert count_params(model) == 50 * 16 + (16 * 16 + 16)


def test_count_params_shared_storage_once() -> None:
    a, b = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
    b.weight = nn.Parameter(a.weight.data)  # different Parameter objects, same memory
    assert count_params(nn.ModuleList([a, b])) == 32
    assert count_params(nn.ModuleList([nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)])) == 64


def test_count_params_matches_plain_sum_without_ties() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2))
    assert count_params(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("groups", "stride", "padding"), [(1, 1, 1), (4, 2, 0)])
def test_count_macs_conv2d(groups: int, stride: int, padding: int) -> None:
    cin, cout, k, n, h, w = 8, 12, 3, 2, 17, 15
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    expected = n * cout * ho * wo * (cin // groups) * k * k
    assert count_macs(conv, (torch.randn(n, cin, h, w),)) == expected


def test_count_macs_linear_and_sequence() -> None:
    assert count_macs(nn.Linear(20, 30), (torch.randn(4, 20),)) == 4 * 20 * 30
    assert count_macs(nn.Linear(20, 30), torch.randn(2, 3, 20)) == 6 * 20 * 30  # single tensor accepted
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    assert count_macs(model, (torch.randn(1, 3, 5, 5),)) == 3 * 4 * 25 + 100 * 7


def test_count_macs_matmul_and_sdpa() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert count_macs(MatMul(), (a, b)) == 2 * 3 * 4 * 5
    bsz, heads, lq, lk, e, ev = 2, 4, 8, 10, 16, 32
    q, k, v = torch.randn(bsz, heads, lq, e), torch.randn(bsz, heads, lk, e), torch.randn(bsz, heads, lk, ev)
    assert count_macs(Attention(), (q, k, v)) == bsz * heads * lq * lk * (e + ev)


def test_count_macs_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model[2].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and model[1].training and not model[2].training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats not updated


def test_eval_mode_restores_mixed_flags_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    model[0].eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model[1].training
        raise RuntimeError
    assert model.training and not model[0].training and model[1].training


def test_measure_latency_report_and_threads_restored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).train()
    before = torch.get_num_threads()
    report = measure_latency(model, (torch.randn(1, 3, 32, 32),), runs=7, warmup=2, threads=1)
    assert isinstance(report, LatencyReport)
    assert report.runs == 7 and report.threads == 1
    assert 0 < report.median_ms <= report.p90_ms
    assert torch.get_num_threads() == before
    assert model.training
    default = measure_latency(model, torch.randn(1, 3, 32, 32), runs=3, warmup=0)
    assert default.threads == before and default.median_ms > 0


def test_measure_latency_rejects_bad_arguments() -> None:
    model = nn.Linear(2, 2)
    for kwargs in ({"runs": 0}, {"warmup": -1}, {"threads": 0}):
        with pytest.raises(ValueError):
            measure_latency(model, (torch.randn(1, 2),), **kwargs)


def test_compare_latency_interleaves_and_restores_state() -> None:
    from fxprune.metrics import compare_latency, default_threads

    calls: list[str] = []

    class Tagged(torch.nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.tag)
            return self.lin(x)

    a, b = Tagged("a").train(), Tagged("b")
    b.lin.eval()
    threads = torch.get_num_threads()
    reports = compare_latency([a, b], torch.randn(2, 4), runs=4, warmup=1, threads=1)
    assert [r.runs for r in reports] == [4, 4] and all(r.threads == 1 for r in reports)
    assert all(r.p10_ms <= r.median_ms <= r.p90_ms for r in reports)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating rounds
    assert torch.get_num_threads() == threads and a.training and b.training and not b.lin.training
    assert 1 <= default_threads() <= 4
