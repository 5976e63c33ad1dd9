"""Fuzz regression: seed 43156, shrunk to 3 ops. random plan at ratio 0.893.

RuntimeError: view size is not compatible with input tensor's size and stride (at least one dimension spans across two contiguous subspaces). Use .reshape(...) instead.

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-11-24 and shrunk by ``fxprune.testing.fuzz.shrink``.
Cause: a conv output pruned to one channel has ambiguous strides and torch gives it a channels-last layout,
so the original's ``view`` fails on the pruned tensor. Fixed the same day: the rewrite turns ``view`` into
``reshape`` (same values) wherever nothing writes in place; the xfail mark was removed and the test stays as
a regression guard.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.passes.importance import random_importance
from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v4 = nn.Linear(3, 4, bias=False)
        self.v5 = nn.Conv2d(4, 4, 1, stride=2, padding=0, dilation=1, groups=1, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v4_t = x0.permute(0, 2, 3, 1)
        v4_t = self.v4(v4_t)
        v4_t = F.gelu(v4_t)
        v4 = v4_t.permute(0, 3, 1, 2).contiguous()  # (2, 4, 8, 8)
        v5 = self.v5(v4)  # (2, 4, 4, 4)
        v5.view(v5.size(0), -1)  # (2, 64)
        return v5


def test_fuzz_seed_43156() -> None:
    model = instantiate(Net, 43156)
    inputs = make_inputs(((2, 3, 8, 8),), 43156)
    check_case(model, inputs, 0.893, random_importance(43156))
