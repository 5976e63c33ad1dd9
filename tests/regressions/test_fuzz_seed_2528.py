"""Fuzz regression: seed 2528, shrunk to 3 ops. random plan at ratio 0.19.

InvariantError: after pruning, %v11 : [num_users=0] = call_module[target=v11](args = (%getitem_1,), kwargs = {}) has shape (2, 0, 8, 8) but (2, 4, 8, 8) was planned

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
        self.v8 = nn.Conv2d(3, 11, 1, stride=1, padding=0, dilation=2, groups=1, bias=False)
        self.v11 = nn.Conv2d(1, 4, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v8 = self.v8(x0)  # (2, 11, 8, 8)
        v9_0, v9_1 = v8.split([10, 1], 1)  # (2, 10, 8, 8), (2, 1, 8, 8)
        self.v11(v9_1)  # (2, 4, 8, 8)
        return v9_0


def test_fuzz_seed_2528() -> None:
    model = instantiate(Net, 2528)
    inputs = make_inputs(((2, 3, 8, 8),), 2528)
    check_case(model, inputs, 0.19, random_importance(2528))
