"""Fuzz regression: seed 171593, shrunk to 3 ops. l2 plan at ratio 0.43, reconstruct=True, heads='query'.

FuzzCheckError: the refit of v5 is 0.219 of its target's energy worse than the least-squares fit on the eager models' own inputs and outputs

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-12-08 and shrunk by ``fxprune.testing.fuzz.shrink``.
Found by the refit check the fuzzer runs on its reconstruct cases (fxprune/testing/refit_check.py).
Cause: the refit zeroed only the removed channels of the layers it had fitted, and a grouped conv (which no
refit changes) consumed ``v3``'s: ``v5`` was fitted on an input computed with them still there. Fixed the
same day: every removed channel is zeroed in the refit's pruned runs (passes/reconstruct.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v3 = nn.Conv2d(3, 28, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)
        self.v4 = nn.Conv2d(28, 24, 1, stride=1, padding=0, dilation=1, groups=4, bias=False)
        self.v5 = nn.Conv2d(24, 4, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v3 = self.v3(x0)  # (2, 28, 8, 8)
        v4 = self.v4(v3)  # (2, 24, 8, 8)
        self.v5(v4)  # (2, 4, 8, 8)
        return x0


def test_fuzz_seed_171593() -> None:
    model = instantiate(Net, 171593)
    inputs = make_inputs(((2, 3, 8, 8),), 171593)
    check_case(model, inputs, 0.43, "l2", reconstruct=True, heads="query")
