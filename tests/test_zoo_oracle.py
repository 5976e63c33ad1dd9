"""The backbone check: every models_zoo model, at several ratios and random plans, equals its masked original."""

from __future__ import annotations

import pytest

import models_zoo
from fxprune.passes.importance import random_importance
from tests.conftest import check_pruned

FAST = [n for n in models_zoo.names() if n != "resnet18"]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_zoo_oracle_l2(name: str, ratio: float) -> None:
    model, x = models_zoo.get(name)
    check_pruned(model, x, ratio)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_zoo_oracle_random_plans(name: str, seed: int) -> None:
    model, x = models_zoo.get(name, seed=seed)
    check_pruned(model, x, [0.2, 0.5, 0.8][seed - 1], importance=random_importance(seed))


def test_resnet18_half_params_quarter() -> None:
    model, x = models_zoo.get("resnet18")
    r = check_pruned(model, x, 0.5)
    assert 0.2 < r.params_after / r.params_before < 0.3
