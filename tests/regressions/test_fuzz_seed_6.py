"""Fuzz regression: seed 6, shrunk to 3 ops. random plan at ratio 0.576.

ZeroDivisionError: integer modulo by zero

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
        self.v1 = nn.Conv2d(3, 10, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)
        self.v8 = nn.Conv2d(4, 4, 1, stride=1, padding=0, dilation=1, groups=4, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v1 = self.v1(x0)  # (2, 10, 8, 8)
        v4_0, v4_1, v4_2 = torch.split(v1, [4, 2, 4], dim=1)  # (2, 4, 8, 8), (2, 2, 8, 8), (2, 4, 8, 8)
        self.v8(v4_2)  # (2, 4, 8, 8)
        return v4_0


def test_fuzz_seed_6() -> None:
    model = instantiate(Net, 6)
    inputs = make_inputs(((2, 3, 8, 8),), 6)
    check_case(model, inputs, 0.576, random_importance(6))
