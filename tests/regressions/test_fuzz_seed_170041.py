"""Fuzz regression: seed 170041, shrunk to 3 ops. l2 plan at ratio 0.467, reconstruct=True.

KeyError: ('param:v4.weight', 1)

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-12-08 and shrunk by ``fxprune.testing.fuzz.shrink``.
Cause: the refit of the layers after a consumer of removed channels (added that day) took ``v4``, a conv
with a forward hook (opaque: its channels are not tracked by the dependency analysis), and looked up its
input channels in the analysis. Fixed the same day: only layers whose input channels the analysis tracks are
refitted. The shrinker wrote the case without ``reconstruct=True``; it was added by hand.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v1 = nn.Conv2d(3, 4, 1, stride=2, padding=0, dilation=2, groups=1, bias=False)
        self.v2 = nn.Conv2d(4, 4, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)
        self.v4 = nn.Conv2d(4, 4, 1)
        self.v4.register_forward_hook(lambda mod, args, out: out.flip(1))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v1 = self.v1(x0)  # (2, 4, 4, 4)
        v2 = self.v2(v1)  # (2, 4, 4, 4)
        v4 = self.v4(v2)  # (2, 4, 4, 4)
        return v4


def test_fuzz_seed_170041() -> None:
    model = instantiate(Net, 170041)
    inputs = make_inputs(((2, 3, 8, 8),), 170041)
    check_case(model, inputs, 0.467, "l2", reconstruct=True)
