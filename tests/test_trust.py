"""No silent miscompilation: the result behaves like the eager original, and the caller's model is untouched.

Each test is a class of bug seen with ordinary but unusual code; each failed before the fix it guards.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import FxPruneError, TraceError, TrainModeError


def _fresh(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(99))


class AliasedInplace(nn.Module):
    """``skip = a; a += f(a)``: eager mutates the tensor ``skip`` names too."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        skip = a
        a += self.c2(a)
        a *= 0.5
        return self.c3(a + skip)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_inplace_on_alias_equals_eager_at_ratio_0_and_passes_oracle(output: str) -> None:
    torch.manual_seed(0)
    model = AliasedInplace().eval()
    x = torch.randn(2, 3, 8, 8)
    small = fxprune.compile(model, 0.0, example_inputs=(x,), output=output)
    y = _fresh(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(y), model(y), rtol=1e-5, atol=1e-6)
    result = fxprune.prune(model, 0.5, example_inputs=(x,), verify=True, output=output)
    assert result.oracle is not None and result.oracle.passed
    assert result.params_after < result.params_before


class TracingAware(nn.Module):
    """A forward that takes another branch while fx traces it: the graph is not the eager model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if not torch.fx._symbolic_trace.is_fx_tracing():
            y = y * 2 + 1
        return self.head(y)


def test_graph_that_differs_from_eager_is_refused() -> None:
    model = TracingAware().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TraceError, match="differs from eager PyTorch"):
        fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class ChannelFlipHook(nn.Module):
    """A hook on a leaf conv that reverses its channels: the conv rule no longer describes its output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.c1.register_forward_hook(lambda mod, args, out: out.flip(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def test_hooked_leaf_is_pinned_and_result_is_right_without_verify() -> None:
    torch.manual_seed(0)
    model = ChannelFlipHook().eval()
    small = fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert small.c1.weight.shape[0] == 8  # kept whole
    y = _fresh(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(y), model(y))
    assert small.c2.weight.shape[1] == 8


class TrainBranches(nn.Module):
    """Train-mode behaviour written in the forward: functional dropout and an auxiliary output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.dropout(torch.relu(self.conv(x)), 0.5, self.training).mean((2, 3))
        out = self.fc(h)
        if self.training:
            return out, h
        return out


def test_train_mode_graph_refuses_to_run_and_module_output_keeps_train_mode() -> None:
    model = TrainBranches().train()
    x = torch.randn(2, 3, 8, 8)
    small = fxprune.compile(model, 0.5, example_inputs=(x,))
    assert small.training
    with pytest.raises(TrainModeError, match="output='module'"):
        small(x)
    small.eval()
    assert isinstance(small(x), torch.Tensor)  # eval mode is what was traced: it runs
    mod = fxprune.compile(model, 0.5, example_inputs=(x,), output="module")
    assert mod.training
    out, h = mod(x)  # the auxiliary output is there, and dropout is active
    torch.manual_seed(1)
    a = mod(x)[0]
    torch.manual_seed(2)
    b = mod(x)[0]
    assert not torch.equal(a, b)


def test_leaf_dropout_needs_no_guard() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(8, 4, 1)).train()
    small = fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
    x = torch.randn(1, 3, 8, 8)
    assert not torch.equal(small(x), small(x))  # nn.Dropout reads its own flag: active in train mode


class FrozenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.bn1(self.c1(x)))


@pytest.mark.parametrize("output", ["graph", "module"])
def test_per_module_training_flags_are_restored(output: str) -> None:
    model = FrozenNorm()
    model.train()
    model.bn1.eval()
    small = fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),), output=output)
    assert small.training and small.c1.training and not small.bn1.training
    assert model.training and not model.bn1.training


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad


class Quantised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(StraightThrough.apply(self.c1(x)))


@pytest.mark.parametrize("output", ["graph", "module"])
def test_custom_autograd_function_keeps_its_backward(output: str, tmp_path: object) -> None:
    torch.manual_seed(0)
    model = Quantised()
    x = torch.randn(1, 3, 8, 8)
    small = fxprune.compile(model, 0.0, example_inputs=(x,), output=output)
    model(x).sum().backward()
    small(x).sum().backward()
    assert model.c1.weight.grad is not None and small.c1.weight.grad is not None
    assert float(model.c1.weight.grad.abs().sum()) > 0
    torch.testing.assert_close(small.c1.weight.grad, model.c1.weight.grad)
    assert not any(n.startswith("_fxprune_function") for n, _ in model.named_modules())  # the caller's tree


class Writer(nn.Module):
    """A forward that writes its own state: a call counter, an EMA, and clamped weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        self.conv.weight.data.clamp_(-0.05, 0.05)
        y = self.conv(x)
        self.ema.mul_(0.9).add_(0.1 * y.detach().mean((0, 2, 3)))
        return self.head(y)


class UntraceableWriter(nn.Module):
    """A root that cannot be traced (pruned part by part) and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        if x.sum() > 1e9:  # data-dependent: the root cannot be traced
            return x
        return self.body(x)


@pytest.mark.parametrize("cls", [Writer, UntraceableWriter])
def test_callers_tensors_are_never_run_or_written(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with contextlib.suppress(FxPruneError):  # failing is allowed; writing the caller's tensors is not
        fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),), verify=cls is Writer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class MaxNormEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16, max_norm=1.0)
        self.fc = nn.Linear(16, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(idx))


def test_embedding_max_norm_is_pinned_and_right_without_verify() -> None:
    torch.manual_seed(0)
    model = MaxNormEmbedding().eval()
    with torch.no_grad():
        model.emb.weight.mul_(3)  # rows above max_norm: the renorm matters
    weight = model.emb.weight.detach().clone()
    idx = torch.randint(0, 20, (2, 6))
    small = fxprune.compile(model, 0.5, example_inputs=(idx,))
    assert torch.equal(model.emb.weight, weight)  # the caller's table was not renormalised
    assert small.emb.weight.shape == (20, 16)
    other = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(small(other), copy.deepcopy(model)(other))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.mlp_in = nn.Linear(16, 32)
        self.mlp_out = nn.Linear(32, 16)
        self.lm_head = nn.Linear(16, 30, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.mlp_out(torch.relu(self.mlp_in(h)))
        return self.lm_head(h)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_ties_stay_ties(output: str) -> None:
    model = TiedLM().eval()
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randint(0, 30, (1, 5)),), output=output, verify=True)
    params = dict(r.model.named_parameters(remove_duplicate=False))
    assert params["lm_head.weight"] is params["emb.weight"]
    assert r.params_after < r.params_before


class NormNet(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.norm = norm(32)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


class FunctionalNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.w = nn.Parameter(torch.rand(32) + 0.5)
        self.c = nn.Linear(32, 32)
        self.g = nn.Parameter(torch.rand(32) + 0.5)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(self.a(x), (32,), self.w, None, 1e-5)
        h = F.rms_norm(self.c(torch.relu(h)), (32,), self.g, 1e-6)
        return self.b(h)


@pytest.mark.parametrize("make", [lambda: NormNet(nn.LayerNorm), lambda: NormNet(nn.RMSNorm), FunctionalNorms],
                         ids=["LayerNorm", "RMSNorm", "functional"])
def test_oracle_is_exact_over_pruned_norms(make: object) -> None:
    torch.manual_seed(0)
    model = make().eval()  # type: ignore[operator]
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randn(4, 8),), verify=True)
    assert r.oracle is not None and r.oracle.applicable and r.oracle.passed, r.oracle
    assert r.params_after < 0.7 * r.params_before  # the normalised dim itself was pruned


def test_oracle_catches_a_wrong_norm() -> None:
    """The exact reference is not vacuous: a pruned norm with the wrong statistics fails it."""
    from fxprune.passes import verify

    torch.manual_seed(0)
    model = NormNet(nn.LayerNorm).eval()
    real = verify.norm_spec
    try:
        verify.norm_spec = lambda n, m: None  # the old reference: normalise over every channel, zeros included
        with pytest.raises(fxprune.InvariantError, match="mask oracle failed"):
            fxprune.prune(model, 0.5, example_inputs=(torch.randn(4, 8),), verify=True)
    finally:
        verify.norm_spec = real


def test_parametrized_weight_is_a_clear_pin_not_a_crash() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    r = fxprune.prune(model, 0.5, example_inputs=(x,), verify=True)
    assert r.oracle is not None and r.oracle.passed
    assert r.model.get_submodule("0").parametrizations.weight.original1.shape[0] == 8
    assert r.params_after < r.params_before  # the layers after it still prune


class SpatialSplit(nn.Module):
    """Split sizes read from other tensors on an unpruned (spatial) dim: they must stay computed."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.c1(x1), self.c2(x2)], 2)
        a, b = torch.split(y, [x1.shape[2], x2.shape[2]], dim=2)
        return self.head(a + b)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_sizes_on_unpruned_dims_stay_dynamic(output: str) -> None:
    torch.manual_seed(0)
    model = SpatialSplit().eval()
    small = fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 7, 7), torch.randn(1, 3, 7, 7)),
                            output=output)
    assert small.c1.out_channels == 4
    x1, x2 = _fresh(2, 3, 9, 11), _fresh(2, 3, 9, 11)
    assert small(x1, x2).shape == model(x1, x2).shape == (2, 4, 9, 11)


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = norm
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.norm(self.a(x))))


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(4, 16), lambda: nn.GroupNorm(1, 16),
                                  lambda: nn.InstanceNorm2d(16, affine=True), lambda: nn.InstanceNorm2d(16)],
                         ids=["GroupNorm4", "GroupNorm1", "InstanceNormAffine", "InstanceNorm"])
def test_channel_norms_are_pruned_and_proven(norm: object) -> None:
    torch.manual_seed(0)
    model = ConvNorm(norm()).eval()  # type: ignore[operator]
    with torch.no_grad():
        for p in model.norm.parameters():
            p.uniform_(0.5, 1.5)
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randn(2, 3, 8, 8),), verify=True)
    assert r.oracle is not None and r.oracle.applicable and r.oracle.passed, r.oracle
    assert r.model.a.out_channels == 8
    pruned = r.model.get_submodule("norm")
    if isinstance(pruned, nn.GroupNorm):
        assert (pruned.num_groups, pruned.num_channels) == (model.norm.num_groups, 8)
    else:
        assert pruned.num_features == 8
    x = _fresh(2, 3, 11, 9)
    assert r.model(x).shape == model(x).shape


def test_finetune_refuses_a_graph_that_cannot_train_like_the_model() -> None:
    model = TrainBranches().eval()
    x = torch.randn(4, 3, 8, 8)
    small = fxprune.compile(model, 0.5, example_inputs=(x,))
    batches = [(x, torch.randint(0, 4, (4,)))]
    with pytest.raises(TrainModeError, match="output='module'"):
        fxprune.finetune(small, batches, epochs=1, lr=0.01, progress=False)
    mod = fxprune.compile(model, 0.5, example_inputs=(x,), output="module")

    class Logits(nn.Module):  # finetune wants logits; the model returns (out, h) in train mode
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            out = self.inner(t)
            return out[0] if isinstance(out, tuple) else out

    history = fxprune.finetune(Logits(mod), batches, epochs=1, lr=0.01, progress=False)
    assert len(history) == 1
