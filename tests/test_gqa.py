"""Grouped-query attention inside the kernel (``F.scaled_dot_product_attention(..., enable_gqa=True)``).

Query head h reads key/value head h // rep. Pruned alone (a decoder layer streamed, or any model that calls
the kernel this way), each key/value head must go with its query heads. The oracle proves every result
against the original with the removed channels zeroed; the eager model is the reference in eval and train
mode (no dropout here, so both must agree with the pruned model's structure).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


class GQA(nn.Module):
    def __init__(self, dim: int = 32, kv: int = 2, rep: int = 3, d: int = 8) -> None:
        super().__init__()
        self.d = d
        self.q, self.k, self.v = nn.Linear(dim, kv * rep * d), nn.Linear(dim, kv * d), nn.Linear(dim, kv * d)
        self.o = nn.Linear(kv * rep * d, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).view(*x.shape[:2], -1, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(a.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("heads", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_kv_heads_go_with_their_query_heads(heads: bool, train: bool) -> None:
    torch.manual_seed(0)
    model = GQA().train(train)
    x = torch.randn(2, 5, 32)
    # output="graph": this forward's own view(..., self.d) cannot take a thinner value head (the module output
    # keeps such modules whole, tested elsewhere); the graph's sizes are rewritten and proven
    r = fxprune.prune(model, 0.5, example_inputs=(x,), prune_heads=heads, verify=True)
    assert r.oracle is not None and r.oracle.applicable and r.oracle.passed
    m = r.model
    dims = {n.args[-1] for n in m.graph.nodes if n.target == "reshape"}  # the rewritten head size
    assert len(dims) == 1
    d = dims.pop()
    q, kv = m.get_submodule("q").out_features // d, m.get_submodule("k").out_features // d
    assert m.get_submodule("v").out_features == kv * d
    if heads:  # whole groups: a key/value head with its 3 query heads
        assert (q, kv, d) == (3, 1, 8)
    else:  # every head kept, each thinned
        assert (q, kv, d) == (6, 2, 4)
    assert m.training == train
    with torch.no_grad():
        assert m.eval()(x).shape == x.shape and model.eval()(x).shape == x.shape
