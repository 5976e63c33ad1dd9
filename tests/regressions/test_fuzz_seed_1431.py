"""Fuzz regression: seed 1431, shrunk to 3 ops. random plan at ratio 0.667.

ShapeError: the model does not run on example inputs of shape (2, 3, 8, 8): IndexError: select(): index 0 out of range for tensor of size [0] at dimension 0

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-11-23 and shrunk by ``fxprune.testing.fuzz.shrink``.
Cause: a group spanning several tensors (split sections, cat inputs) could lose every channel of one of
them. Fixed in 90b21d0 (groups are split by the tensors their channels appear in); the xfail mark was
removed and the test stays as a regression guard.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.passes.importance import random_importance
from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v1 = nn.Conv2d(3, 11, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)
        self.v7 = nn.BatchNorm2d(2)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v1 = self.v1(x0)  # (2, 11, 8, 8)
        v6_0, v6_1 = v1.split([9, 2], 1)  # (2, 9, 8, 8), (2, 2, 8, 8)
        self.v7(v6_1)  # (2, 2, 8, 8)
        return v6_0


def test_fuzz_seed_1431() -> None:
    model = instantiate(Net, 1431)
    inputs = make_inputs(((2, 3, 8, 8),), 1431)
    check_case(model, inputs, 0.667, random_importance(1431))
