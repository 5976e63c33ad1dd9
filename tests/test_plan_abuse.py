"""Tampered plan JSON is refused with a typed error, never replayed as another model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import fxprune


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


X = torch.randn(2, 6)


def _plan() -> dict:
    return fxprune.prune(_net(), 0.5, example_inputs=(X,)).plan.to_dict()


def _group(data: dict) -> dict:
    return next(g for g in data["groups"] if g["kept"] and len(g["kept"]) < g["size"])


@pytest.mark.parametrize("tamper", [
    lambda d: _group(d)["kept"].__setitem__(0, 4.5),
    lambda d: _group(d)["kept"].__setitem__(0, "4"),
    lambda d: _group(d)["kept"].__setitem__(0, True),
    lambda d: _group(d)["kept"].__setitem__(0, -1),
    lambda d: _group(d)["kept"].__setitem__(0, 99),
    lambda d: _group(d)["kept"].append(_group(d)["kept"][0]),
    lambda d: _group(d).__setitem__("size", 3.0),
    lambda d: d.__setitem__("ratio", 1.5),
    lambda d: d.__setitem__("prune_heads", "false"),
    lambda d: d.__setitem__("hidden", [[0, 1.5]]),
], ids=["float", "string", "bool", "negative", "out-of-range", "repeated", "float-size", "ratio", "flag-string",
        "hidden-float"])
def test_tampered_plans_are_refused(tamper, tmp_path) -> None:
    data = copy.deepcopy(_plan())
    tamper(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(fxprune.PlanMismatchError, match="malformed"):
        fxprune.apply(_net(), str(path), (X,))


def test_an_untouched_plan_replays(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan()))
    small = fxprune.apply(_net(), str(path), (X,))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in _net().parameters())
