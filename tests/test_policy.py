"""Pruning policy: importance criteria, global ranking, budgets, rounding, overrides and replayable plans."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
import models_zoo
from fxprune.metrics import count_macs
from tests.conftest import check_pruned


class TwoConv(nn.Module):
    """conv a (8 filters) -> BN -> conv b: filter i of ``a`` has L2 norm and BN gamma set by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 3, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.arange(1, 9, dtype=torch.float).view(8, 1, 1, 1).expand(8, 2, 1, 1))
            self.bn.weight.copy_(torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1]))
            self.b.weight.zero_()

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


def _kept_filters(importance: object) -> list[int]:
    torch.manual_seed(0)
    model = TwoConv().eval()
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 2, 4, 4),), importance=importance)
    group = next(i for i, g in enumerate(r.plan.groups) if "a.weight[0]" in g.producers)
    return list(r.plan.kept[group])


def test_l2_and_l1_keep_the_largest_filters() -> None:
    assert _kept_filters("l2") == [4, 5, 6, 7]
    assert _kept_filters("l1") == [4, 5, 6, 7]


def test_bn_scale_follows_gamma() -> None:
    assert _kept_filters("bn_scale") == [0, 1, 2, 3]


def test_lamp_preserves_the_magnitude_order_within_a_group() -> None:
    assert _kept_filters("lamp") == [4, 5, 6, 7]


def test_random_is_seeded_and_differs_from_l2() -> None:
    assert _kept_filters("random") == _kept_filters("random")


def test_taylor_uses_gradients() -> None:
    torch.manual_seed(0)
    model = TwoConv().eval()
    with torch.no_grad():
        model.b.weight.zero_()
        model.b.weight[:, 0] = 1.0  # only channel 0 reaches the loss: the only non-zero gradient
    batches = [(torch.randn(4, 2, 4, 4), torch.zeros(4, 4, 4, dtype=torch.long))]
    r = fxprune.prune(model, 0.875, example_inputs=(torch.randn(1, 2, 4, 4),), importance=fxprune.Taylor(batches))
    group = next(i for i, g in enumerate(r.plan.groups) if "a.weight[0]" in g.producers)
    assert r.plan.kept[group] == (0,)


def test_custom_callable_importance() -> None:
    assert _kept_filters(lambda g: -np.arange(g.size, dtype=float)) == [0, 1, 2, 3]


def test_unknown_importance_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown importance"):
        _kept_filters("magic")


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "densenet", "yolo_block", "resnext"])
def test_mac_prediction_equals_flop_counter(name: str) -> None:
    model, x = models_zoo.get(name)
    r = fxprune.prune(model, 0.5, example_inputs=x)
    assert r.macs_before == count_macs(model, x)
    assert r.macs_after == count_macs(r.model, x)


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "unet"])
def test_target_macs_within_two_percent(name: str) -> None:
    model, x = models_zoo.get(name)
    r = check_pruned(model, x, 0.5, target_macs=0.5)
    achieved = count_macs(r.model, x) / count_macs(model, x)
    assert 0.48 <= achieved <= 0.5, achieved


def test_target_params() -> None:
    model, x = models_zoo.get("resnet_bottleneck")
    r = fxprune.prune(model, example_inputs=x, target_params=0.4)
    assert 0.38 <= r.params_after / r.params_before <= 0.4


def test_unreachable_budget_is_a_clear_error() -> None:
    model, x = models_zoo.get("resnet_basic")
    with pytest.raises(fxprune.FxPruneError, match="cannot reach"):
        fxprune.prune(model, example_inputs=x, target_macs=0.001)


def test_global_ranking_differs_from_uniform_and_is_valid() -> None:
    model, x = models_zoo.get("mobilenet_v2")
    uni = check_pruned(model, x, 0.5, target_macs=0.5)
    glo = check_pruned(model, x, 0.5, target_macs=0.5, global_ranking=True)
    assert [len(k) for k in uni.plan.kept] != [len(k) for k in glo.plan.kept]
    for g, kept in zip(glo.plan.groups, glo.plan.kept, strict=True):
        assert len(kept) >= 1 and len(kept) >= g.n_pinned


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "densenet", "yolo_block"])
def test_round_to_eight(name: str) -> None:
    model, x = models_zoo.get(name)
    r = check_pruned(model, x, 0.5, round_to=8, expect_shrink=False)
    for g, kept in zip(r.plan.groups, r.plan.kept, strict=True):
        if len(kept) < g.size:
            assert len(kept) % 8 == 0 and len(kept) > 0, (g.producers, len(kept))


def test_module_overrides_and_min_channels() -> None:
    model, x = models_zoo.get("resnet_basic")
    r = fxprune.prune(model, 0.5, example_inputs=x, ratios={"layers.1": 0.0}, min_channels=12)
    assert r.model.get_submodule("layers.1.0.conv1").out_channels == model.get_submodule("layers.1.0.conv1").out_channels
    for g, kept in zip(r.plan.groups, r.plan.kept, strict=True):
        assert len(kept) >= min(12, g.size)


@pytest.mark.parametrize("bad", [{"round_to": 0}, {"min_channels": 0}, {"ratios": {"conv1": 1.2}}])
def test_bad_policy_arguments(bad: dict) -> None:
    model, x = models_zoo.get("resnet_basic")
    with pytest.raises(ValueError):
        fxprune.prune(model, 0.5, example_inputs=x, **bad)


def test_plan_round_trip_in_a_new_process(tmp_path: Path) -> None:
    model, x = models_zoo.get("yolo_block", seed=3)
    r = fxprune.prune(model, 0.5, example_inputs=x, importance="random")
    r.plan.save(tmp_path / "plan.json")
    torch.save(r.model.state_dict(), tmp_path / "weights.pt")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(r.model(*x), tmp_path / "out.pt")
    script = textwrap.dedent(f"""
        import torch, fxprune, models_zoo
        fresh, _ = models_zoo.get("yolo_block", seed=7)  # other weights: only the architecture matters
        x = torch.load(r"{tmp_path / 'x.pt'}")
        small = fxprune.apply(fresh, r"{tmp_path / 'plan.json'}", x)
        small.load_state_dict(torch.load(r"{tmp_path / 'weights.pt'}"))
        small.eval()
        want = torch.load(r"{tmp_path / 'out.pt'}")
        got = small(*x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        print("replayed")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replayed" in proc.stdout


def test_plan_mismatch_names_the_group(tmp_path: Path) -> None:
    model, x = models_zoo.get("resnet_basic")
    fxprune.prune(model, 0.5, example_inputs=x).plan.save(tmp_path / "plan.json")
    other, y = models_zoo.get("resnet_bottleneck")
    with pytest.raises(fxprune.PlanMismatchError, match="group|channel groups"):
        fxprune.apply(other, str(tmp_path / "plan.json"), y)


def test_sensitivity_curves_and_allocation(tmp_path: Path) -> None:
    model, x = models_zoo.get("resnet_basic")
    batch = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        target = model(batch)

    def fidelity(m: nn.Module) -> float:  # agreement with the unpruned outputs: higher is better
        with torch.no_grad():
            return -float((m(batch) - target).pow(2).mean())

    sens = fxprune.sensitivity(model, x, fidelity, ratios=(0.25, 0.5, 0.75), progress=False)
    assert sens.baseline == pytest.approx(0.0, abs=1e-10)
    assert sens.groups and all(len(v) == 3 for v in sens.metric.values())
    values = [v for g in sens.groups for v in sens.metric[g.id]]
    assert all(v <= 0.0 for v in values) and min(values) < -1e-6  # every cut moves the output away
    assert "r=0.5" in sens.table()
    sens.plot(str(tmp_path / "sens.png"))
    assert (tmp_path / "sens.png").stat().st_size > 1000
    ratios = sens.allocate(target_macs=0.6)
    r = check_pruned(model, x, 0.0, group_ratios=ratios)
    assert r.macs_after / r.macs_before <= 0.6


@pytest.mark.parametrize("p", [2.0, 1.0, 0.5])
def test_row_sums_match_a_direct_reduction(p: float) -> None:
    """``MemberSlice.row_sums`` (a norm over the contiguous inner dims, then a sum over the outer ones) against
    the plain definition: the sum of ``|w|**p`` over every dim but ``dim``, for all rows and for an index."""
    from fxprune.passes.importance import MemberSlice

    torch.manual_seed(0)
    shapes = [(6,), (8, 4), (8, 4, 3, 3), (16, 1, 3, 3), (5, 7, 1, 1), (300, 256, 1, 1), (64, 40, 5, 5)]
    for shape in shapes:
        t = torch.randn(shape)
        for dim in range(len(shape)):
            ref = (t.movedim(dim, 0).reshape(shape[dim], -1).double().abs() ** p).sum(1)
            index = torch.arange(0, shape[dim], 2)
            for idx in (None, index):
                m = MemberSlice("x", "x", dim, "Conv2d", t, idx, np.zeros(shape[dim], dtype=np.int64), None)
                want = ref if idx is None else ref[idx]
                torch.testing.assert_close(m.row_sums(p).double(), want, rtol=1e-5, atol=1e-6)
