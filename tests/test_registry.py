"""A new op is added through the registry alone: one ``register`` call per op, nothing else edited.

Each test registers an op of its own (rule, shape shortcut, MAC formula, attribute fix-up, literal
rewriter), prunes a model that uses it with the mask oracle on, and checks that every part was used.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune import fast
from fxprune.rules import OpSpec, RuleContext, register
from fxprune.rules import registry as reg
from fxprune.rules.common import linear_couplings
from fxprune.rules.literals import split_sizes
from fxprune.rules.registry import MacQuery
from fxprune.rules.tensor_ops import split
from tests.conftest import check_pruned


@pytest.fixture(autouse=True)
def _clean_registry():
    """Every test leaves the registry as it found it."""
    reg.load_builtins()
    saved = (dict(reg._MODULES), dict(reg._FUNCTIONS), dict(reg._METHODS))
    yield
    for table, old in zip((reg._MODULES, reg._FUNCTIONS, reg._METHODS), saved, strict=True):
        table.clear()
        table.update(old)
    reg._type_cache.clear()


class Mixer(nn.Module):
    """A user's own linear layer with a size attribute, kept as a leaf."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.width_out = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight.shape[0] == self.width_out, "attribute not fixed up"
        return torch.relu(x @ self.weight.T)


def mixer_rule(node: fx.Node, ctx: RuleContext) -> None:
    x, y = ctx.tensor(node.args[0]), ctx.out()
    w = ctx.param(ctx.module(), "weight")
    linear_couplings(ctx, x, y, w, None)
    ctx.produce(w, 0)


calls = {"shape": 0}


def mixer_shape(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    calls["shape"] += 1
    return torch.empty((*x.shape[:-1], mod.weight.shape[0]), dtype=x.dtype, device="meta")


def mixer_macs(q: MacQuery) -> int:
    w = q.param_shape(q.module, "weight")
    return math.prod(q.out) * w[1]


def mixer_fixup(mod: nn.Module, new_in: int | None) -> None:
    mod.width_out = mod.weight.shape[0]


class MixerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.mix, self.head = nn.Linear(8, 32), Mixer(32, 24), nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(torch.relu(self.a(x))))


def test_module_type_through_the_registry_alone() -> None:
    torch.manual_seed(0)
    model, x = MixerNet().eval(), torch.randn(5, 8)
    before = fxprune.prune(model, 0.5, example_inputs=(x,), leaves=["mix"])
    assert before.model.mix.weight.shape == (24, 32)  # an opaque leaf pins what it touches

    register(Mixer, OpSpec(rule=mixer_rule, shape=mixer_shape, macs=mixer_macs, fixup=mixer_fixup))
    calls["shape"] = 0
    r = check_pruned(model, (x,))  # a registered module type is traced as one leaf
    assert (calls["shape"] > 0) == fast.ENABLED, "the shape shortcut is used exactly when shortcuts are on"
    mix = r.model.mix
    assert mix.weight.shape == (12, 16) and mix.width_out == 12
    # MACs: a (5*32*8) + mix (5*24*32) + head (5*4*24) before pruning, from the registered formula.
    assert r.macs_before == 5 * 32 * 8 + 5 * 24 * 32 + 5 * 4 * 24
    assert r.macs_after == 5 * 16 * 8 + 5 * 12 * 16 + 5 * 4 * 12


def test_subclass_overriding_forward_inherits_no_rule() -> None:
    register(Mixer, OpSpec(rule=mixer_rule, shape=mixer_shape, macs=mixer_macs, fixup=mixer_fixup))

    class Flipped(Mixer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).flip(-1)

    spec = reg.module_spec(Flipped(4, 4))
    assert spec.rule is None and spec.shape is None and spec.macs is None
    assert spec.fixup is mixer_fixup  # attributes are the class's, whatever forward does


@torch.fx.wrap
def split_at(x: torch.Tensor, sizes: list[int], dim: int) -> tuple[torch.Tensor, ...]:
    return torch.split(x, sizes, dim)


class SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.q = nn.Conv2d(3, 16, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(10, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = split_at(self.a(x), [6, 10], 1)
        return self.p(u) + self.q(v)


def test_function_with_literal_sizes_through_the_registry_alone() -> None:
    torch.manual_seed(0)
    model, x = SplitNet().eval(), torch.randn(2, 3, 8, 8)
    register(split_at, rule=split, literals=split_sizes)
    r = check_pruned(model, (x,))
    node = next(n for n in r.model.graph.nodes if n.name == "split_at")
    assert node.target is torch.split  # this rewriter writes sections back as torch.split
    assert sum(node.args[1]) == r.model.a.out_channels < 16  # the literal sizes were rewritten
    # The generated code does not re-wrap torch.split under the user's wrap: later traces still work.
    assert fxprune.prune(SplitNet().eval(), 0.5, example_inputs=(x,)).oracle is None


def test_register_rejects_what_it_cannot_key() -> None:
    with pytest.raises(TypeError, match="not an nn.Module"):
        register(int, rule=mixer_rule)
    with pytest.raises(TypeError, match="unknown OpSpec fields"):
        register(Mixer, ruel=mixer_rule)
