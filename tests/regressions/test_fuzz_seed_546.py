"""Fuzz regression: seed 546, shrunk to 4 ops. random plan at ratio 0.464.

InvariantError: after pruning, %v4 : [num_users=0] = call_module[target=v4](args = (%cat,), kwargs = {}) has shape (2, 0, 4, 6) but (2, 12, 4, 6) was planned

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
        self.v1 = nn.Conv2d(6, 32, 1, stride=1, padding=0, dilation=2, groups=2, bias=False)
        self.v4 = nn.Conv2d(4, 22, 1, stride=2, padding=0, dilation=1, groups=2, bias=False)

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v1 = self.v1(x0)  # (2, 32, 8, 12)
        v2_0, v2_1, v2_2, v2_3, v2_4, v2_5, v2_6, v2_7, v2_8, v2_9, v2_10, v2_11, v2_12, v2_13, v2_14, v2_15 = torch.split(v1, 2, dim=1)  # 16 x (2, 2, 8, 12)
        v3 = torch.cat([v2_7, v2_9], dim=1)  # (2, 4, 8, 12)
        self.v4(v3)  # (2, 22, 4, 6)
        return (v2_8, v2_13)


def test_fuzz_seed_546() -> None:
    model = instantiate(Net, 546)
    inputs = make_inputs(((2, 6, 8, 12),), 546)
    check_case(model, inputs, 0.464, random_importance(546))
