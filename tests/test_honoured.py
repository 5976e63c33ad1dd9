"""A request that ends up doing nothing is said by default (``PruneResult.unhonoured`` and a warning)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import fxprune

transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))


def test_prune_heads_on_the_newest_transformers_removes_heads(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        r = fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), prune_heads=True, output="module", verify=True)
    assert (r.model.config.num_attention_heads, r.model.config.num_key_value_heads) == (2, 1)
    assert r.model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert not r.unhonoured and "removed no attention head" not in caplog.text


def test_opaque_attention_with_prune_heads_is_said(caplog: pytest.LogCaptureFixture) -> None:
    attention = [f"model.layers.{i}.self_attn" for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        r = fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), prune_heads=True, output="module",
                          leaves=attention)
    assert r.params_after < r.params_before  # the MLPs still shrink
    assert r.model.config.num_attention_heads == 4
    assert any("removed no attention head" in n for n in r.unhonoured)
    assert "removed no attention head" in caplog.text  # printed by default, not only with -v


def test_leaves_keep_only_what_they_name() -> None:
    model = _llama()
    r = fxprune.prune(model, 0.5, example_inputs=(IDS,), leaves=["lm_head"], output="module", verify=True)
    assert r.params_after < r.params_before
    assert r.model.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
    inner = fxprune.prune(model, 0.5, example_inputs=(IDS,), leaves=["model.layers.0.mlp"], output="module")
    assert inner.model.model.layers[0].mlp.up_proj.weight.shape == (64, 32)  # the named leaf stays whole
    assert inner.model.model.layers[1].mlp.up_proj.weight.shape == (32, 32)


class AllPinned(nn.Module):
    """An LSTM reads the conv's channels and a data-dependent branch follows: nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.proj(x))
        return y


def test_nothing_pruned_is_said_with_the_reasons(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        r = fxprune.prune(AllPinned().eval(), 0.5, example_inputs=(torch.randn(2, 5, 8),))
    assert r.params_after == r.params_before
    assert r.unhonoured and r.unhonoured[0].startswith("nothing was pruned: ")
    assert "nothing was pruned" in caplog.text


def test_ratio_zero_is_not_a_complaint() -> None:
    r = fxprune.prune(AllPinned().eval(), 0.0, example_inputs=(torch.randn(2, 5, 8),))
    assert r.unhonoured == ()


def test_calibration_without_an_activation_criterion_is_said(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        fxprune.prune(net, 0.5, example_inputs=(torch.randn(2, 4),), calibration=[torch.randn(3, 4)],
                      importance="l2")
    assert "calibration= is not used" in caplog.text


def test_calibration_makes_the_default_criterion_activation_aware() -> None:
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x, batches = torch.randn(2, 4), [torch.randn(8, 4) for _ in range(2)]
    default = fxprune.prune(net, 0.5, example_inputs=(x,), calibration=batches)
    activation = fxprune.prune(net, 0.5, example_inputs=(x,), calibration=batches, importance="activation")
    l2 = fxprune.prune(net, 0.5, example_inputs=(x,))
    assert default.plan.kept == activation.plan.kept and l2.plan.kept == fxprune.prune(
        net, 0.5, example_inputs=(x,), importance="l2").plan.kept


def test_a_language_model_pruned_by_weights_alone_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), output="module")
    assert caplog.text.count("weight magnitude alone") == 1 and "--data" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), output="module", calibration=[IDS])
    assert "weight magnitude alone" not in caplog.text


@pytest.mark.parametrize(("batches", "match"), [
    (torch.randn(3, 4), "one tensor"),
    ([], "empty"),
    ([torch.randint(0, 4, (3, 4))], "integers|kind of dtype"),
    ([torch.randn(3, 4, 1)], "dimensions"),
    ([(torch.randn(3, 4), torch.randn(3, 4))], "2 input"),
])
def test_bad_calibration_batches_are_typed_errors(batches: object, match: str) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(fxprune.ArgumentError, match=match):
        fxprune.prune(net, 0.5, example_inputs=(torch.randn(2, 4),), importance="activation", calibration=batches)


def test_float64_batches_are_cast_to_the_model_dtype() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    batches = [torch.randn(5, 4, dtype=torch.float64)]
    r = fxprune.prune(net, 0.5, example_inputs=(x,), importance="activation", calibration=batches, verify=True)
    same = fxprune.prune(net, 0.5, example_inputs=(x,), importance="activation",
                         calibration=[b.float() for b in batches])
    assert r.plan.kept == same.plan.kept


@pytest.mark.parametrize("output", ["graph", "module"])
def test_heads_removed_in_a_graph_are_not_reported_missing(output: str) -> None:
    """With the cache off the part inside a GraphModule keeps a config that says 4 heads: the attention's own
    parameters, not the config, say whether heads went."""
    model = _llama()
    model.config.use_cache = False
    r = fxprune.prune(model, 0.5, example_inputs=(IDS,), prune_heads=True, output=output)
    assert r.model.get_submodule("model.layers.0.self_attn.q_proj").weight.shape == (16, 32)
    assert not any("attention head" in n for n in r.unhonoured)
