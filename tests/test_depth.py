"""Depth pruning: whole decoder layers chosen by calibration loss (``fxprune.prune_depth``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxprune

transformers = pytest.importorskip("transformers")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layers of very different weight, so the choice is not a tie
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(0.2 + i)
    return model


BATCHES = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def _loss(model: torch.nn.Module) -> float:
    """Next-token cross-entropy over BATCHES, computed here on the eager model."""
    total = 0.0
    with torch.no_grad():
        for ids in BATCHES:
            logits = model(ids, use_cache=False).logits
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)))
    return total / len(BATCHES)


def _without(model: torch.nn.Module, removed: list[int]) -> torch.nn.Module:
    other = copy.deepcopy(model)
    other.model.layers = torch.nn.ModuleList(b for i, b in enumerate(other.model.layers) if i not in removed)
    return other


def test_the_removed_blocks_are_the_greedy_loss_choice(tmp_path: Path) -> None:
    model = _llama()
    r = fxprune.prune_depth(model, 2, calibration=BATCHES)
    assert r.blocks == "model.layers" and len(r.model.model.layers) == 2
    first = {i: _loss(_without(model, [i])) for i in range(4)}  # independent: each single removal, eagerly
    assert r.removed[0] == min(first, key=first.get)
    assert dict(r.steps[0]) == pytest.approx(first, rel=1e-5)
    second = {i: _loss(_without(model, [r.removed[0], i])) for i in range(4) if i != r.removed[0]}
    assert r.removed[1] == min(second, key=second.get)
    assert r.loss_after == pytest.approx(_loss(_without(model, list(r.removed))), rel=1e-5)
    assert r.loss_before == pytest.approx(_loss(model), rel=1e-5)
    assert r.params_after < r.params_before and len(model.model.layers) == 4  # the caller's model untouched
    with torch.no_grad():  # the result is the model without those blocks
        ids = BATCHES[0]
        assert torch.allclose(r.model(ids).logits, _without(model, list(r.removed))(ids).logits, atol=1e-6)
    assert r.model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in r.model.model.layers] == [0, 1]
    r.model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = BATCHES[1][:1, :5]
    with torch.no_grad():
        tokens = back.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
        assert torch.equal(tokens, r.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                    max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False))


@pytest.mark.parametrize(("remove", "match"), [(4, "keep at least one"), (-1, "keep at least one"), ("2", "count")])
def test_bad_counts_are_argument_errors(remove: object, match: str) -> None:
    with pytest.raises(fxprune.ArgumentError, match=match):
        fxprune.prune_depth(_llama(), remove, calibration=BATCHES)  # type: ignore[arg-type]


def test_a_fraction_and_a_named_block_list() -> None:
    r = fxprune.prune_depth(_llama(), 0.25, calibration=BATCHES, blocks="model.layers")
    assert len(r.removed) == 1
    with pytest.raises(fxprune.ArgumentError, match="nn.ModuleList"):
        fxprune.prune_depth(_llama(), 1, calibration=BATCHES, blocks="model.norm")


def test_cli_depth_then_width(tmp_path: Path) -> None:
    from fxprune.cli import main

    _llama().save_pretrained(tmp_path / "llama")
    text = tmp_path / "calib.txt"
    text.write_text("while True:\n    x = x + 1\n" * 20)
    code = main(["compile", f"hf:{tmp_path / 'llama'}", "--depth", "1", "--ratio", "0.25", "--data", str(text),
                 "--runs", "0", "--save-pretrained", str(tmp_path / "out")])
    assert code == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.num_hidden_layers == 3 and back.config.intermediate_size == 48
    assert main(["compile", f"hf:{tmp_path / 'llama'}", "--depth", "1", "--runs", "0"]) != 0  # no --data
