"""The eager check sees every output and every state the forward updates."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune


class Stateful(nn.Module):
    """An average and a counter updated in forward from zero, the average read back into the output.

    Hidden channels 0-7 of ``a`` never fire (bias -1e3): activation-aware importance removes exactly them at
    ratio 0.5, so the pruned model must equal the original over every call, state included."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 6)
        with torch.no_grad():
            self.a.bias[:8] = -1e3
        self.register_buffer("ema", torch.zeros(6))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)
        self.count.add_(1)
        return h + self.ema.view(1, 6)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_state_updated_from_zero_stays_exact_over_calls(output: str) -> None:
    model = Stateful().eval()
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randn(3, 4),), verify=True, output=output,
                      importance="activation", calibration=[torch.randn(5, 4) for _ in range(2)])
    assert r.params_after < r.params_before and r.oracle.passed
    mine, theirs = copy.deepcopy(model), r.model
    xs = [torch.randn(3, 4) for _ in range(3)]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(theirs(x), mine(x), rtol=1e-5, atol=1e-5)
    assert int(theirs.count) == int(mine.count) == 3
    torch.testing.assert_close(theirs.ema, mine.ema)
    assert int(model.count) == 0 and not model.ema.any()  # the caller's model was never run


class LostUpdate(nn.Module):
    """State replaced by a new tensor (an attribute assignment, not an op on the buffer): fx records the
    computation but not the assignment, so the graph leaves the buffer as it was."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.register_buffer("seen", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.seen = self.seen + y.mean(0)
        return y + self.seen


def test_state_the_graph_loses_is_named() -> None:
    with pytest.raises(fxprune.TraceError, match="'seen'"):
        fxprune.prune(LostUpdate().eval(), 0.5, example_inputs=(torch.randn(2, 4),), partial=False)


class Noisy(nn.Module):
    """Noise in the eval forward: no oracle can compare two runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        return self.c(h + 0.1 * torch.randn_like(h))


@pytest.mark.parametrize("output", ["graph", "module"])
def test_a_random_forward_is_named_not_blamed_on_fxprune(output: str) -> None:
    r = fxprune.prune(Noisy().eval(), 0.5, example_inputs=(torch.randn(2, 4),), verify=True, output=output)
    assert r.params_after < r.params_before
    assert not r.oracle.applicable and "random" in r.oracle.reason


transformers = pytest.importorskip("transformers")


def test_gpt2_with_the_cache_keeps_every_output_field() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                                                 bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (1, 8))
    r = fxprune.prune(model, 0.5, example_inputs=(ids,), verify=True)
    with torch.no_grad():
        want, got = model(ids), r.model(ids)
    assert list(got.keys()) == list(want.keys())  # the cache is not dropped
    assert r.params_after < r.params_before
    module = fxprune.prune(model, 0.5, example_inputs=(ids,), verify=True, output="module").model
    with torch.no_grad():  # generation runs from the cache the model returns
        assert list(module(ids).keys()) == list(want.keys())
        tokens = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                 pad_token_id=0)
    assert tokens.shape == (1, 11)


def test_a_graph_that_drops_an_output_field_is_refused() -> None:
    from fxprune.passes.eager_check import structure, structure_difference

    eager = structure({"logits": torch.ones(1), "cache": object()})
    graph = structure({"logits": torch.ones(1)})
    assert "field 'cache' (object) is missing" in structure_difference(graph, eager)
    assert structure_difference(structure((torch.ones(1), None)), structure([torch.ones(1), None])) == ""
