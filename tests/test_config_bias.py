"""``reconstruct="bias"``: biases a Hugging Face config can describe, for the refit to compensate into (FLAP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fxprune
from fxprune.config_bias import with_config_biases
from fxprune.passes.refit import DAMP

transformers = pytest.importorskip("transformers")

CAL = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(4)]


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("heads", [False, "query"])
def test_biases_are_added_compensated_proven_and_reload(heads: bool | str, tmp_path: Path) -> None:
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), calibration=CAL, reconstruct="bias",
                      prune_heads=heads, output="module", verify=True)
    assert r.oracle.passed
    assert r.model.config.mlp_bias and r.model.config.attention_bias == bool(heads)
    layer = r.model.model.layers[0]
    assert layer.mlp.down_proj.bias.abs().sum() > 0  # the removed inputs' mean, compensated
    first = layer.self_attn.q_proj if heads else layer.mlp.gate_proj  # runs before every refitted layer
    assert torch.equal(first.bias, torch.zeros_like(first.bias))  # nothing to compensate
    fits = {f.name: f for f in r.reconstruction}
    assert fits["model.layers.0.mlp.down_proj"].bias
    r.model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(CAL[1]).logits, r.model(CAL[1]).logits)
    # the caller's model: no bias, no flag, the same weights
    assert not model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_compensation_is_the_least_squares_solution_with_a_ones_column() -> None:
    """The first refitted layer (layer 0's down_proj, nothing before it refitted): numpy on the eager model's
    own activations, with a ones column for the bias, gives the same weight and bias."""
    model = _llama()
    r = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), calibration=CAL, reconstruct="bias",
                      output="module", verify=True)
    mlp, pruned = model.model.layers[0].mlp, r.model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for ids in CAL:
            model(ids)
    hook.remove()
    x = torch.cat(seen).reshape(-1, 128).double().numpy()
    rows = {tuple(w.tolist()): j for j, w in enumerate(mlp.up_proj.weight.detach())}
    kept = [rows[tuple(w.tolist())] for w in pruned.up_proj.weight.detach()]
    xk = np.concatenate([x[:, kept], np.ones((len(x), 1))], 1)
    target = x @ mlp.down_proj.weight.detach().double().numpy().T
    h = xk.T @ xk
    solution = np.linalg.solve(h + DAMP * h.diagonal().mean() * np.eye(len(h)), xk.T @ target).T
    np.testing.assert_allclose(pruned.down_proj.weight.detach().double().numpy(), solution[:, :-1], rtol=1e-3,
                               atol=1e-5)
    np.testing.assert_allclose(pruned.down_proj.bias.detach().double().numpy(), solution[:, -1], rtol=1e-3,
                               atol=1e-5)


def test_a_model_without_such_a_config_is_left_as_it_is_and_said(caplog: pytest.LogCaptureFixture) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    assert with_config_biases(net, (torch.randn(2, 8),), True) == (net, [])
    assert "Sequential has no Hugging Face config flag" in caplog.text
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert with_config_biases(gpt2, (CAL[0],), True) == (gpt2, [])  # biases already: no flag to set
    assert "GPT2LMHeadModel has no Hugging Face config flag" in caplog.text


def test_a_config_that_cannot_describe_them_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A forward that does not follow the flag (here a config class whose models ignore mlp_bias) is detected by
    building a model from the new config: the copy is dropped and the refit goes on without biases."""
    model = _llama()
    real = type(model).__init__

    def ignores_flag(self, config):  # type: ignore[no-untyped-def]
        config.mlp_bias = False
        real(self, config)

    cls = type("NoBiasLlama", (type(model),), {"__init__": ignores_flag})
    model.__class__ = cls
    out, said = with_config_biases(model, (CAL[0][:2],), False)
    assert out is model and said and "no bias added" in said[0]
    assert "cannot describe biases" in caplog.text


@pytest.mark.parametrize("bad", ["Bias", 1.0, "yes"])
def test_a_bad_value_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="reconstruct"):
        fxprune.prune(_llama(), 0.5, example_inputs=(CAL[0][:2],), calibration=CAL, reconstruct=bad)


def test_streaming_refuses_it(tmp_path: Path) -> None:
    model = _llama()
    model.save_pretrained(tmp_path / "in")
    with pytest.raises(ValueError, match="reconstruct='bias'"):
        fxprune.prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, calibration=CAL, reconstruct="bias")


def test_a_calibration_generator_is_read_once() -> None:
    """The options are checked before the biases are added (the batches listed once): the generator still feeds
    the refit."""
    r = fxprune.prune(_llama(), 0.5, example_inputs=(CAL[0][:2],), calibration=(b for b in CAL), reconstruct="bias",
                      output="module", verify=True)
    assert r.model.config.mlp_bias and r.reconstruction
    assert all(f.bias for f in r.reconstruction if ".mlp." in f.name)  # what mlp_bias describes


def test_the_command_line_adds_biases_in_memory(tmp_path: Path) -> None:
    from fxprune.cli import main

    _llama().save_pretrained(tmp_path / "llama")
    text = tmp_path / "calib.txt"
    text.write_text("for i in range(10):\n    print(i * i)\n" * 16)
    assert main(["compile", f"hf:{tmp_path / 'llama'}", "--ratio", "0.5", "--data", str(text), "--runs", "0",
                 "--reconstruct-bias", "--save-pretrained", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.mlp_bias and back.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
