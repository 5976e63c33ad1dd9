"""Fuzz regression: seed 638, shrunk to 4 ops. l2 plan at ratio 0.437.

ShapeError: the model does not run on example inputs of shape (2, 3, 8, 8): RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x0 and 324x3)

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-11-23 and shrunk by ``fxprune.testing.fuzz.shrink``.
Cause: a group spanning several tensors (split sections, cat inputs) could lose every channel of one of
them. Fixed in 90b21d0 (groups are split by the tensors their channels appear in); the xfail mark was
removed and the test stays as a regression guard.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v5 = nn.ConvTranspose2d(3, 7, 3, stride=2, padding=0, output_padding=1, groups=1, bias=False)
        self.v10 = nn.Linear(324, 4, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v5 = self.v5(x0)  # (2, 7, 18, 18)
        v6_0, v6_1, v6_2 = torch.chunk(v5, 3, dim=1)  # (2, 3, 18, 18), (2, 3, 18, 18), (2, 1, 18, 18)
        v9 = v6_2.view(v6_2.size(0), -1)  # (2, 324)
        self.v10(v9)  # (2, 4)
        return v6_1


def test_fuzz_seed_638() -> None:
    model = instantiate(Net, 638)
    inputs = make_inputs(((2, 3, 8, 8),), 638)
    check_case(model, inputs, 0.437, "l2")
