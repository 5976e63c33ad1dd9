"""Fuzz regression: seed 186673, shrunk to 4 ops. l2 plan at ratio 0.378, reconstruct=True, whole heads.

FuzzCheckError: the refit of v8_fc2 is 0.0899 of its target's energy worse than the least-squares fit on the eager models' own inputs and outputs

Found by the fxprune fuzzer (benchmarks/fuzz.py) on 2026-12-08 and shrunk by ``fxprune.testing.fuzz.shrink``.
Found by the refit check the fuzzer runs on its reconstruct cases (fxprune/testing/refit_check.py).
Cause: after the parts of a model were pruned (here the opaque ``v4``), ``settle_parts`` copied back from
the caller's model every tensor whose value had changed and whose shape had not, as state a recording run
may have written: the refitted bias of ``v8_fc2`` (and, in a model pruned part by part, the weights of every
layer refitted with all its inputs kept) went back to the original. Fixed the same day: the tensors a refit
wrote are not copied back (``pipeline._refitted``). The shrinker's file lacked the ``OpaqueMLP`` import.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.testing import instantiate, make_inputs
from fxprune.testing.fuzz import check_case
from fxprune.testing.trust_ops import OpaqueMLP


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.v1 = nn.Conv2d(3, 6, 1, stride=1, padding=0, dilation=1, groups=1, bias=False)
        self.v4 = OpaqueMLP(6)
        self.v8_fc1 = nn.Conv2d(6, 9, 1)
        self.v8_fc2 = nn.Conv2d(9, 6, 1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        v1 = self.v1(x0)  # (2, 6, 8, 8)
        v2_t = v1.view(2, 3, 2, 8, 8)
        v2_t = torch.transpose(v2_t, 1, 2).contiguous()
        v2 = v2_t.view(2, 6, 8, 8)  # (2, 6, 8, 8)
        v4 = self.v4(v2, None)  # (2, 6, 8, 8)
        v8_t = F.adaptive_avg_pool2d(v2, 1)
        v8_t = F.relu(self.v8_fc1(v8_t))
        v8_t = torch.sigmoid(self.v8_fc2(v8_t))
        v2 * v8_t  # (2, 6, 8, 8)
        return v4


def test_fuzz_seed_186673() -> None:
    model = instantiate(Net, 186673)
    inputs = make_inputs(((2, 3, 8, 8),), 186673)
    check_case(model, inputs, 0.378, "l2", dynamic_batch=False, reconstruct=True, heads=True)
