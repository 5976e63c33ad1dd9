"""Fuzz regression: seed 172677, shrunk to 3 ops. l2 plan at ratio 0.82, reconstruct=True.

FuzzCheckError: the refit of v5 is 0.0909 of its target's energy worse than the least-squares fit on the eager models' own inputs and outputs

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-12-08 and shrunk by ``fxprune.testing.fuzz.shrink``.
Found by the refit check the fuzzer runs on its reconstruct cases (fxprune/testing/refit_check.py).
Cause: a forward that updates a buffer (a call counter): the refit's unpruned and pruned runs of a batch
shared one state, so the pruned run saw the counter the unpruned one had just advanced. Fixed the same
day: each keeps its own state, advanced once per batch (passes/paired_runs.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v3 = nn.Conv2d(3, 4, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)
        self.register_buffer('v4_s', torch.zeros(4))
        self.v5 = nn.Conv2d(4, 4, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v3 = self.v3(x0)  # (2, 4, 8, 8)
        self.v4_s.add_(1.0)
        v4 = v3 + self.v4_s.view(1, 4, 1, 1)  # (2, 4, 8, 8)
        self.v5(v4)  # (2, 4, 8, 8)
        return x0


def test_fuzz_seed_172677() -> None:
    model = instantiate(Net, 172677)
    inputs = make_inputs(((2, 3, 8, 8),), 172677)
    check_case(model, inputs, 0.82, "l2", reconstruct=True)
