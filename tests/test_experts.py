"""Fused mixture-of-experts modules (``fxprune.experts``): each expert pruned to its own channels, proven exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import experts
from fxprune.errors import FxPruneError

E, H, INNER, TOKENS = 4, 8, 12, 10


class Experts(nn.Module):
    """Transformers' fused-experts layout (``[E, 2I, H]`` gate then up, ``[E, H, I]`` down), not its class."""

    def __init__(self, transposed: bool = False, bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_experts, self.intermediate_dim, self.is_transposed = E, INNER, transposed
        gate_up = (E, H, 2 * INNER) if transposed else (E, 2 * INNER, H)
        self.gate_up_proj = nn.Parameter(torch.randn(gate_up, generator=g))
        self.down_proj = nn.Parameter(torch.randn((E, INNER, H) if transposed else (E, H, INNER), generator=g))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * INNER, generator=g))
            self.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g))
        self.act_fn = nn.SiLU()

    def _linear(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        w, b = getattr(self, name)[e], getattr(self, f"{name}_bias", None)
        y = x @ w if self.is_transposed else F.linear(x, w)
        return y if b is None else y + b[e]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():  # the experts hit: data-dependent, torch.fx cannot trace it
            token, pos = torch.where(top_k_index == e)
            gate, up = self._linear(hidden_states[token], "gate_up_proj", e).chunk(2, dim=-1)
            y = self._linear(self.act_fn(gate) * up, "down_proj", e)
            out.index_add_(0, token, y * top_k_weights[token, pos, None])
        return out


class Block(nn.Module):
    """A router (top-2 of E) in front of the experts."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.experts = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        return self.experts(x, index, weights)


def _call(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(TOKENS)])
    return x, index, torch.rand(TOKENS, 2, generator=g)


def _masked_equals_pruned(m: nn.Module, k: int) -> tuple[nn.Module, torch.Tensor]:
    x, index, w = _call()
    pruned, diff = experts.prune_experts(m, k, [((x, index, w), {})])  # type: ignore[misc]
    lay = experts.layout(m)
    keep = experts.select(experts.score(m, lay, experts.resolve("l2")), k)  # type: ignore[arg-type]
    with torch.no_grad():
        want = experts.masked(m, lay, keep)(x.double(), index, w.double())  # type: ignore[arg-type]
        got = pruned.double()(x.double(), index, w.double())
    assert torch.allclose(got, want, rtol=0, atol=1e-12) and diff < 1e-12
    return pruned, keep


@pytest.mark.parametrize(("transposed", "bias"), [(False, False), (True, True)])
def test_experts_alone_equal_the_masked_original(transposed: bool, bias: bool) -> None:
    m = Experts(transposed, bias)
    pruned, keep = _masked_equals_pruned(m, 6)
    assert pruned.intermediate_dim == 6 and pruned.down_proj.shape == ((E, 6, H) if transposed else (E, H, 6))
    assert pruned.num_experts == E and m.intermediate_dim == INNER  # the given module keeps its width


def test_each_expert_keeps_its_own_channels() -> None:
    m = Experts()
    pruned, keep = _masked_equals_pruned(m, 6)
    assert len({tuple(k.tolist()) for k in keep}) == E  # random weights: four different index sets
    for e in range(E):
        rows = torch.cat([keep[e], keep[e] + INNER])
        assert torch.equal(pruned.gate_up_proj[e], m.gate_up_proj[e][rows])
        assert torch.equal(pruned.down_proj[e], m.down_proj[e][:, keep[e]])


class ThreeD(nn.Module):
    """A 3D parameter per expert, but no gated MLP: not fused experts."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H, H))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            token, _ = torch.where(index == e)
            out.index_add_(0, token, x[token] @ self.weight[e])
        return out


def test_other_modules_are_not_experts() -> None:
    assert experts.layout(ThreeD()) is None
    odd = Experts()
    odd.down_proj = nn.Parameter(torch.randn(E, H, INNER + 1))  # inner widths disagree
    assert experts.layout(odd) is None
    extra = Experts()
    extra.scale = nn.Parameter(torch.ones(E))  # a parameter the layout does not know
    assert experts.layout(extra) is None and experts.prune_experts(extra, 6, []) is None

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(H, E)
            self.mix = ThreeD()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(x, torch.topk(self.router(x), 2, dim=-1).indices)

    model = Wrapped().eval()
    x = _call()[0]
    try:
        r = fxprune.prune(model, 0.5, example_inputs=(x,), output="module")
    except FxPruneError:
        return  # nothing prunable: refused as a whole
    assert torch.equal(r.model.mix.weight, model.mix.weight)


def _state(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def test_pipeline_prunes_the_experts_and_leaves_the_caller_alone(one_thread: object) -> None:
    model = Block(Experts()).eval()
    x = _call()[0]
    before = _state(model)
    r = fxprune.prune(model, 0.6, example_inputs=(x,), output="module", round_to=4)
    after = model.state_dict()
    assert all(torch.equal(after[k], t) and after[k].data_ptr() == p for k, (t, p) in before.items())
    assert r.model.experts.intermediate_dim == 4 and r.model.experts.down_proj.shape == (E, H, 4)  # 12 * 0.4
    assert torch.equal(r.model.router.weight, model.router.weight)  # the router is untouched
    report = next(p for p in r.parts if p.name == "experts")
    assert report.oracle == "passed" and report.params_after < report.params_before
    assert all(p.data_ptr() not in {ptr for _, ptr in before.values()} for p in r.model.experts.parameters())


def test_ignored_experts_stay(one_thread: object) -> None:
    model = Block(Experts()).eval()
    for ignore in (["experts"], [Experts]):
        r = fxprune.prune(model, 0.5, example_inputs=(_call()[0],), output="module", ignore=ignore)
        assert r.model.experts.down_proj.shape == (E, H, INNER)


def test_activation_and_gradient_scores(one_thread: object) -> None:
    model = Block(Experts()).eval()
    x = _call()[0]
    r = fxprune.prune(model, 0.5, example_inputs=(x,), output="module", importance="activation",
                      calibration=[x, _call(2)[0]])
    assert r.model.experts.intermediate_dim == 6
    loss = lambda out, target: (out - target).square().mean()  # noqa: E731
    r = fxprune.prune(model, 0.5, example_inputs=(x,), output="module", importance=fxprune.Taylor(
        [(x, torch.zeros(TOKENS, H))], loss))
    assert r.model.experts.intermediate_dim == 6
    assert next(p for p in r.parts if p.name == "experts").oracle == "passed"


def test_a_spoiled_slice_fails_the_oracle() -> None:
    m = Experts()
    lay = experts.layout(m)
    assert lay is not None
    keep = experts.select(experts.score(m, lay, experts.resolve("l2")), 6)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(_call(), {})]
    assert experts.oracle(m, experts.prune(m, lay, keep), lay, keep, calls) < 1e-12
    wrong = keep.roll(1, dims=0)  # expert e sliced with expert e-1's indices
    with pytest.raises(FxPruneError, match="oracle failed"):
        experts.oracle(m, experts.prune(m, lay, wrong), lay, keep, calls)


def test_the_oracle_covers_experts_the_example_did_not_hit() -> None:
    m = Experts()
    lay = experts.layout(m)
    assert lay is not None
    keep = experts.select(experts.score(m, lay, experts.resolve("l2")), 6)
    x, _, w = _call()
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((x, torch.tensor([[0, 1]] * TOKENS), w), {})]
    spoiled = keep.clone()
    spoiled[3] = keep[2]  # expert 3 is never routed to by the example
    assert experts.oracle(m, experts.prune(m, lay, spoiled), lay, keep, calls) < 1e-12  # blind to it alone
    with pytest.raises(FxPruneError, match="oracle failed"):
        experts.oracle(m, experts.prune(m, lay, spoiled), lay, keep, calls + experts.every_expert(m, lay, calls))


def test_qwen2_moe_experts_alone() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = transformers.Qwen2MoeConfig(hidden_size=H, num_experts=E, moe_intermediate_size=INNER,
                                         experts_implementation="eager")
    torch.manual_seed(0)
    m = Qwen2MoeExperts(config)
    nn.init.normal_(m.gate_up_proj)
    nn.init.normal_(m.down_proj)
    pruned, _ = _masked_equals_pruned(m, 6)
    assert pruned.intermediate_dim == 6 and pruned.config is m.config


class _GatedMLP(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate, self.up = torch.nn.Linear(4, width), torch.nn.Linear(4, width)
        self.down = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("width", [7, 32, 96])
@pytest.mark.parametrize(("ratio", "round_to", "min_channels", "global_ranking"),
                         [(0.5, None, 1, False), (0.3, 8, 1, False), (0.9, None, 5, False), (0.95, None, 1, True),
                          (0.4, 16, 3, True)])
def test_an_expert_keeps_what_a_traced_mlp_of_its_width_keeps(width: int, ratio: float, round_to: int | None,
                                                               min_channels: int, global_ranking: bool) -> None:
    """The experts' keep count (``select.lone_keep``) is the count the whole pipeline gives a plain gated MLP of
    the same inner width under the same options: computed here by pruning one."""
    from fxprune.passes.select import Policy, lone_keep

    policy = Policy(ratio, global_ranking=global_ranking, round_to=round_to, min_channels=min_channels)
    r = fxprune.prune(_GatedMLP(width), ratio, example_inputs=(torch.randn(2, 4),), round_to=round_to,
                      min_channels=min_channels, global_ranking=global_ranking)
    assert lone_keep(width, policy) == r.model.get_submodule("gate").out_features
