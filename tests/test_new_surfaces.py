"""The surfaces added last round (hidden size, calibration, plans, half precision) under abuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxprune

transformers = pytest.importorskip("transformers")

IDS = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def _llama(**changes: int) -> nn.Module:
    torch.manual_seed(0)
    config = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    config.update(changes)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def test_hidden_size_through_weightless_norms() -> None:
    """OLMo's LayerNorm has no weight: only its normalized_shape says its width."""
    torch.manual_seed(0)
    config = transformers.OlmoConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    model = transformers.OlmoForCausalLM(config).eval()
    r = fxprune.prune(model, 0.5, example_inputs=(IDS,), hidden=0.5, output="module", verify=True)
    assert r.model.config.hidden_size == 32 and r.oracle.passed
    assert r.model.model.norm.normalized_shape == (32,)


def test_a_hidden_size_the_config_rejects_is_rounded_up(tmp_path: Path) -> None:
    """hidden=0.3 of 64 is 45, not a multiple of the 4 heads: LlamaConfig refuses it when saved."""
    r = fxprune.prune(_llama(hidden_size=64), 0.5, example_inputs=(IDS,), hidden=0.3, output="module")
    assert r.model.config.hidden_size == 48
    r.model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, r.model(IDS).logits)


class ReadsConfig(nn.Module):
    """A forward that reshapes with ``config.hidden_size`` at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.config = transformers.PretrainedConfig(hidden_size=32)
        self.emb, self.ln = nn.Embedding(50, 32), nn.LayerNorm(32)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 50)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        flat = h.reshape(-1, self.config.hidden_size)
        return self.head(h + self.fc2(torch.relu(self.fc1(self.ln(flat)))).view(h.shape))


@pytest.mark.parametrize("output", ["graph", "module"])
def test_a_forward_reading_the_config_hidden_size(output: str) -> None:
    ids = torch.randint(0, 50, (2, 8))
    r = fxprune.prune(ReadsConfig().eval(), 0.5, example_inputs=(ids,), hidden=0.5, verify=True, output=output)
    assert r.model.emb.embedding_dim == 16
    assert r.model.fc1.out_features == 32  # the MLP by ratio, the residual by hidden= only
    with torch.no_grad():
        assert r.model(torch.randint(0, 50, (3, 5))).shape == (3, 5, 50)


def test_padded_batches_with_attention_masks() -> None:
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0  # left padding
    batches = [(IDS, mask), (IDS[:1, :7], mask[:1, :7])]
    r = fxprune.prune(_llama(), 0.5, example_inputs=(IDS, mask), importance="activation", calibration=batches,
                      verify=True, output="module")
    assert r.params_after < r.params_before


@pytest.mark.parametrize("hidden", [None, 0.5])
def test_a_plan_on_a_model_of_another_config_is_refused(hidden: float | None) -> None:
    plan = fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), hidden=hidden, output="module").plan
    for other in (_llama(intermediate_size=96), _llama(num_hidden_layers=3)):
        with pytest.raises(fxprune.PlanMismatchError):
            fxprune.apply(other, plan, (IDS,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_through_every_output(dtype: torch.dtype, tmp_path: Path) -> None:
    model = _llama().to(dtype)
    graph = fxprune.prune(model, 0.5, example_inputs=(IDS,), verify=True, onnx=str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").exists() and graph.params_after < graph.params_before
    module = fxprune.prune(model, 0.5, example_inputs=(IDS,), hidden=0.5, verify=True, output="module")
    assert module.model.dtype == dtype
    module.model.save_pretrained(tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype)
    assert back.dtype == dtype and back.config.hidden_size == 16


@pytest.mark.parametrize(("hidden", "width"), [(0.0, 32), (0.99, 4)])
def test_extreme_hidden_fractions(hidden: float, width: int) -> None:
    """0 keeps the width; 0.99 keeps the fewest channels the config accepts (a multiple of the 4 heads)."""
    r = fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), hidden=hidden, output="module", verify=True)
    assert r.model.config.hidden_size == width and r.params_after < r.params_before
    with pytest.raises(fxprune.ArgumentError, match="hidden"):
        fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), hidden=1.0)


def test_hidden_with_ignore_through_the_stream_is_refused() -> None:
    with pytest.raises(fxprune.ArgumentError, match="hidden size runs through it"):
        fxprune.prune(_llama(), 0.5, example_inputs=(IDS,), hidden=0.5, ignore=["model.layers.0.mlp"])
