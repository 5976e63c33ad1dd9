"""Fuzz regression: seed 172449, shrunk to 3 ops. l2 plan at ratio 0.768, reconstruct=True.

FuzzCheckError: the refit of v5 is 0.0644 of its target's energy worse than the least-squares fit on the eager models' own inputs and outputs

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-12-08 and shrunk by ``fxprune.testing.fuzz.shrink``.
Found by the refit check the fuzzer runs on its reconstruct cases (fxprune/testing/refit_check.py).
Cause: the refit's masked runs zeroed the removed channels of a functional norm's weight (a parameter
read with get_attr) in place, so the next unpruned run computed its targets with that weight zeroed.
Fixed the same day: a masked parameter is masked in a copy (passes/verify.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v1 = nn.Conv2d(3, 4, 1, stride=2, padding=0, dilation=1, groups=1, bias=False)
        self.v4_g = nn.Parameter(torch.rand(4) + 0.5)
        self.v5 = nn.Conv2d(4, 4, 1, stride=2, padding=0, dilation=1, groups=1, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v1 = self.v1(x0)  # (2, 4, 4, 4)
        v4 = F.rms_norm(v1.permute(0, 2, 3, 1), (4,), self.v4_g).permute(0, 3, 1, 2).contiguous()  # (2, 4, 4, 4)
        v5 = self.v5(v4)  # (2, 4, 2, 2)
        return v5


def test_fuzz_seed_172449() -> None:
    model = instantiate(Net, 172449)
    inputs = make_inputs(((2, 3, 8, 8),), 172449)
    check_case(model, inputs, 0.768, "l2", reconstruct=True)
