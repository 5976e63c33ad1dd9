"""Tracing: example values for shape iteration, specialising only where the user's forward is re-checked,
and no attribute a forward writes while it is traced survives the trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.passes.trace import trace


class HeadsFromShape(nn.Module):
    """Hugging Face style: ``view(*x.shape[:-1], -1, head_dim)`` (plain symbolic_trace cannot iterate a shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(*shape).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.o(out.reshape(*x.shape[:-1], -1))


def test_shape_iteration_stays_dynamic_in_graph_output() -> None:
    """The traced graph keeps reading sizes from the input: other batch and sequence sizes still run."""
    torch.manual_seed(0)
    model = HeadsFromShape().eval()
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randn(2, 5, 16),), verify=True)
    assert r.oracle is not None and r.oracle.passed
    assert r.model.get_submodule("q").out_features == 8 and not r.parts  # traced whole, not piecewise
    x = torch.randn(3, 7, 16)
    assert r.model(x).shape == model(x).shape == (3, 7, 16)


class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        y = self.a(x)
        if y.shape[1] > 1:  # a branch on a size
            y = F.relu(y)
        return self.b(y)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(8, 8), ShapeBranch(), nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.block(self.inp(x)))


def test_shape_branches_are_specialised_only_for_module_output() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8),)
    model = Outer().eval()
    _, opaque = trace(model, (), 1, x, specialize=False)
    assert "block" in opaque  # graph output: a branch on a size is never baked in
    gm, opaque = trace(model, (), 1, x, specialize=True)
    assert not opaque and any(n.target is F.relu for n in gm.graph.nodes)
    r = fxprune.prune(model, 0.5, example_inputs=x, output="module", verify=True)
    assert type(r.model) is Outer and r.model.block.a.out_features == 8  # the user's forward, proven equal
    graph = fxprune.prune(model, 0.5, example_inputs=x, verify=True)  # graph: the block is a proven part
    assert graph.model.get_submodule("block.a").out_features == 8 and graph.parts[0].name == "block"


class Caching(nn.Module):
    """Writes a tensor it computes onto itself (like Ultralytics' Detect anchors)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.shape = None
        self.cache = None

    def forward(self, x):
        if self.shape != x.shape:
            self.shape = x.shape
            self.cache = torch.zeros_like(x)
        return self.fc(x) + self.cache


def test_tracing_leaves_no_proxy_on_modules() -> None:
    torch.manual_seed(0)
    model = Caching().eval()
    x = (torch.randn(2, 8),)
    r = fxprune.prune(model, 0.5, example_inputs=x, output="module")
    # The trace ran this forward with Proxies; what it wrote was undone, and later real runs cache real values.
    assert not isinstance(r.model.shape, torch.fx.Proxy) and not isinstance(r.model.cache, torch.fx.Proxy)
    assert model.shape is None  # and the caller's model was never run
    assert torch.allclose(r.model(*x), model(*x))


@pytest.mark.parametrize("specialize", [False, True])
def test_list_inputs_are_not_iterated_without_specialising(specialize: bool) -> None:
    class ListIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, xs):
            return [self.fc(x) for x in xs]

    xs = ([torch.randn(1, 4), torch.randn(1, 4)],)
    if specialize:
        gm, _ = trace(ListIn(), (), 1, xs, specialize=True)
        assert sum(n.op == "call_module" for n in gm.graph.nodes) == 2  # unrolled for the example's 2 items
    else:
        with pytest.raises(fxprune.TraceError):
            trace(ListIn(), (), 1, xs, specialize=False)


def test_branches_on_data_are_never_specialised() -> None:
    """``if y.sum().item() > 0`` depends on the data: even for output="module" that module stays opaque."""

    class DataBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            y = self.a(x)
            if y.sum().item() > 0:
                y = F.relu(y)
            return self.b(y)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.block = nn.Linear(8, 8), DataBranch()

        def forward(self, x):
            return self.block(self.inp(x))

    x = (torch.randn(2, 8),)
    _, opaque = trace(Wrapper(), (), 1, x, specialize=True)
    assert "block" in opaque  # not traced through with the example's branch baked in
    with pytest.raises(fxprune.TraceError):
        trace(DataBranch(), (), 1, x, specialize=True)


class TorchFunctions(nn.Module):
    """Torch functions, functionals, tensor methods called as functions, and a property: every path into
    ``Proxy.__torch_function__``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        z = torch.cat([y, torch.sigmoid(y)], 1)
        a, b = torch.Tensor.split(z, 4, 1)  # a tensor method (written in Python) reached as a function
        z = torch.flatten(a * b, 1)
        w = torch.add(torch.flatten(y, 1), 1.0).sum(1, keepdim=True)
        return F.normalize(z, dim=1) * w + torch.abs(z).mean() + z.T.sum()


def test_torch_functions_are_recorded_as_fx_records_them() -> None:
    from fxprune.fast import tensor_attributes

    # The shortcut answers "no tensor method" only for functions outside every Tensor entry of torch's table.
    assert set(torch.overrides.get_overridable_functions()[torch.Tensor]) <= tensor_attributes()
    model = TorchFunctions().eval()
    ours, _ = trace(model)
    ref = torch.fx.symbolic_trace(model)
    def rows(gm: torch.fx.GraphModule) -> list[tuple[str, str, str, str]]:
        return [(n.op, n.name, str(n.target), str(n.args)) for n in gm.graph.nodes]
    assert rows(ours) == rows(ref)
    assert ("call_method", "split") in {(n.op, n.target) for n in ours.graph.nodes}
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), model(x))
