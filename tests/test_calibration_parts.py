"""Calibration batches reach every part of a model pruned part by part (Hugging Face Llama).

The kept MLP channels of every decoder layer must be exactly the activation-aware choice computed
independently on the eager model over the same batches: ``||W_down[:, c]||_2 * ||X_c||_2`` with ``X`` what
arrives at ``down_proj``, the top channels kept.
"""

from __future__ import annotations

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")


def _llama(use_cache: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=use_cache,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _eager_choice(model: torch.nn.Module, batches: list[torch.Tensor], keep: int) -> list[set[int]]:
    """Per decoder layer, the channels Wanda's structured score keeps, computed on the eager model."""
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def record(_m: torch.nn.Module, args: tuple, i: int = i) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[i] = sums.get(i, 0) + x.square().sum(0)
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(record))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    chosen = []
    for i, layer in enumerate(model.model.layers):
        score = layer.mlp.down_proj.weight.detach().double().norm(dim=0) * sums[i].sqrt()
        chosen.append(set(score.topk(keep).indices.tolist()))
    return chosen


def _kept_rows(original: torch.nn.Linear, pruned: torch.nn.Linear) -> set[int]:
    """Which rows of ``original`` survive in ``pruned`` (rows are distinct under random init)."""
    rows = {tuple(r.tolist()): j for j, r in enumerate(original.weight.detach())}
    return {rows[tuple(r.tolist())] for r in pruned.weight.detach()}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("shapes", ["same", "other"])
def test_calibration_decides_every_layer(use_cache: bool, shapes: str) -> None:
    model = _llama(use_cache)
    g = torch.Generator().manual_seed(1)
    example = torch.randint(0, 96, (1, 12), generator=g)
    sizes = [(1, 12)] * 4 if shapes == "same" else [(2, 7), (1, 20), (3, 5), (1, 12)]
    batches = [torch.randint(0, 96, s, generator=g) for s in sizes]
    r = fxprune.prune(model, 0.5, example_inputs=(example,), importance="activation", calibration=batches,
                      verify=True, output="module")
    expected = _eager_choice(model, batches, 32)
    on_example = _eager_choice(model, [example], 32)
    for i, (layer, want, naive) in enumerate(zip(r.model.model.layers, expected, on_example, strict=True)):
        got = _kept_rows(model.model.layers[i].mlp.up_proj, layer.mlp.up_proj)
        assert got == want, f"layer {i}: {len(got & want)} of 32 channels agree with the calibration choice"
        assert want != naive or shapes == "same"  # the batches, not the example, decide
    assert all(p.oracle in ("passed", "") for p in r.parts)


def test_a_generator_of_batches_is_accepted() -> None:
    model = _llama(True)
    example = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    batches = [torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    listed = fxprune.prune(model, 0.5, example_inputs=(example,), importance="activation", calibration=batches)
    generated = fxprune.prune(model, 0.5, example_inputs=(example,), importance="activation",
                              calibration=(b for b in batches))
    for a, b in zip(listed.model.parameters(), generated.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_batches_of_other_shapes_with_the_cache_off(output: str) -> None:
    """The root traces whole (specialised to the example): Taylor and activation batches of another batch
    size and length run on the eager copy instead of failing in the graph."""
    model = _llama(False)
    g = torch.Generator().manual_seed(2)
    example = torch.randint(0, 96, (1, 12), generator=g)

    def loss(out: object, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.logits.reshape(-1, 96), target.reshape(-1))

    pairs = [(torch.randint(0, 96, (2, 9), generator=g), torch.randint(0, 96, (2, 9), generator=g)) for _ in range(2)]
    taylor = fxprune.prune(model, 0.5, example_inputs=(example,), importance=fxprune.Taylor(pairs, loss),
                           output=output, verify=True)
    assert taylor.params_after < taylor.params_before
    batches = [torch.randint(0, 96, (3, 7), generator=g), torch.randint(0, 96, (1, 20), generator=g)]
    act = fxprune.prune(model, 0.5, example_inputs=(example,), importance="activation", calibration=batches,
                        output=output, verify=True)
    if output == "module":
        expected = _eager_choice(model, batches, 32)
        for i, layer in enumerate(act.model.model.layers):
            assert _kept_rows(model.model.layers[i].mlp.up_proj, layer.mlp.up_proj) == expected[i]


def test_cli_data_decides_every_layer(tmp_path) -> None:
    """``fxprune compile hf:FOLDER --importance activation --data FILE``: the batches read from the file
    (bytes taken modulo the small vocabulary) decide the kept channels of every layer."""
    from fxprune.cli import main
    from fxprune.data import load_batches

    model = _llama(True)
    folder, out, text = tmp_path / "llama", tmp_path / "small", tmp_path / "calib.txt"
    model.save_pretrained(folder)
    text.write_text("def f(x):\n    return [x * i for i in range(10)]  # calibration text\n" * 8)
    code = main(["compile", f"hf:{folder}", "--ratio", "0.5", "--importance", "activation", "--data", str(text),
                 "--save-pretrained", str(out), "--runs", "0", "--in-memory"])  # streamed: test_streaming.py
    assert code == 0
    batches = [b[0] for b in load_batches(text, ((1, 32),), vocabulary=96)]
    expected = _eager_choice(model, batches, 32)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for i, layer in enumerate(back.model.layers):
        assert _kept_rows(model.model.layers[i].mlp.up_proj, layer.mlp.up_proj) == expected[i]
