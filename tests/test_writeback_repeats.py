"""A write-back failure in one repeat of a block keeps that module whole in every repeat, in one retry.

``output="module"`` runs the user's own forward on the pruned weights; where it cannot (a forward that
reads a size from its config), the module it names is kept whole and the compile runs again. The same
module of every other layer fails the same way, so all are kept at once (``writeback.repeats_of``), not
one compile per layer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import pipeline
from fxprune.passes.writeback import repeats_of


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv1d(4, 4, 1)  # same name, another type: not a repeat


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block(), Odd(), Block()])
        self.stages = nn.Sequential(nn.ModuleList([Block(), Block()]), nn.ModuleList([Block()]))
        self.head = nn.Linear(4, 4)


def test_repeats_of_every_enclosing_list() -> None:
    net = Net()
    assert repeats_of(net, ["layers.1.inner"]) == ["layers.0.inner", "layers.1.inner", "layers.3.inner"]
    assert repeats_of(net, ["stages.0.1.out"]) == ["stages.0.0.out", "stages.0.1.out", "stages.1.0.out"]
    assert repeats_of(net, ["head", "layers.0.out"]) == ["head", "layers.0.out", "layers.1.out", "layers.3.out"]


def test_llama_attention_kept_whole_in_every_layer_on_one_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 12))
    calls: list[Any] = []
    real = pipeline.prepare

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[2])  # the modules kept whole so far
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", counted)
    result = fxprune.prune(model, 0.5, example_inputs=(ids,), output="module", verify=True)
    # The first rewrite's write-back names layer 0's o_proj; every layer's is kept whole and the plan made
    # again on a fork of the same trace (no second trace), and the plan records them for a replay.
    assert len(calls) == 1
    assert set(result.plan.kept_whole) == {f"model.layers.{i}.self_attn.o_proj" for i in range(3)}
    assert result.oracle is not None and result.oracle.passed
    assert result.params_after < result.params_before
    assert result.model.model.layers[2].mlp.down_proj.in_features == 64
    with torch.no_grad():
        assert result.model(ids).logits.shape == model(ids).logits.shape
