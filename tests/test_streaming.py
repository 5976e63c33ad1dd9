"""Streaming a Hugging Face folder layer by layer (``fxprune.streaming``) against the in-memory path.

For the tests' tiny Llama, Qwen2 and GPT-2 configs the streamed folder must hold exactly the weights the
in-memory path gives, and reload (``from_pretrained``) to identical logits; every layer passes its oracle.
Calibration is carried from layer to layer: each layer's kept MLP channels are the activation-aware choice
computed independently on the eager model whose earlier layers are the streamed ones. Broken folders get a
typed error naming the file, and a run that fails part-way leaves no output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.errors import ArgumentError, FxPruneError, ModelLoadError
from fxprune.streaming import prune_pretrained

transformers = pytest.importorskip("transformers")


def _model(family: str, *, tie: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    elif family == "qwen2":
        config = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    else:
        config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _example() -> tuple[torch.Tensor]:
    return (torch.randint(0, 96, (1, 32), generator=torch.Generator().manual_seed(0)),)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_streamed_equals_in_memory(family: str, tmp_path: Path) -> None:
    model = _model(family)
    model.save_pretrained(tmp_path / "in")
    heads = family != "gpt2"  # GPT-2's config derives the attention width from the hidden size: kept whole
    ignore = [transformers.models.gpt2.modeling_gpt2.GPT2Attention] if family == "gpt2" else []
    streamed = prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, prune_heads=heads, ignore=ignore)
    assert all(p.oracle == "passed" for p in streamed.parts) and len(streamed.parts) == 3
    in_memory = fxprune.prune(model, 0.5, example_inputs=_example(), output="module", prune_heads=heads,
                              ignore=ignore, verify=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _same_weights(in_memory.model, reloaded)
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(in_memory.model(x).logits, reloaded(x).logits)
    assert streamed.params_after == sum(p.numel() for p in reloaded.parameters())
    assert streamed.params_before == sum(p.numel() for p in model.parameters())
    if heads:
        assert reloaded.config.num_attention_heads == 2 and reloaded.config.num_key_value_heads == 1
    assert streamed.config_changes and all(getattr(in_memory.model.config, k) == v
                                           for k, v in streamed.config_changes.items())


def test_query_heads_stream_as_in_memory(tmp_path: Path) -> None:
    """prune_heads="query" while streaming: every key/value head kept, the config (num_attention_heads) follows,
    and the folder equals the in-memory result."""
    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    streamed = prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, prune_heads="query")
    in_memory = fxprune.prune(model, 0.5, example_inputs=_example(), output="module", prune_heads="query")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _same_weights(in_memory.model, reloaded)
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 2)
    assert all(p.oracle == "passed" for p in streamed.parts)


def test_tied_bfloat16_and_shards(tmp_path: Path) -> None:
    model = _model("llama", tie=True, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "in")
    (tmp_path / "in" / "tokenizer_config.json").write_text("{}")
    r = prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, prune_heads=True, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" not in index["weight_map"]
    assert "tokenizer_config.json" in r.files and (tmp_path / "out" / "tokenizer_config.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert reloaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    in_memory = fxprune.prune(model, 0.5, example_inputs=_example(), output="module", prune_heads=True)
    _same_weights(in_memory.model, reloaded)
    out = reloaded.generate(_example()[0][:, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def _channel_choice(model: torch.nn.Module, batches: list[torch.Tensor], layer: int, keep: int) -> set[int]:
    """The MLP channels of ``layer`` that the activation-aware score keeps, on the eager model."""
    acc: list[torch.Tensor] = []
    down = model.model.layers[layer].mlp.down_proj

    def record(_m: torch.nn.Module, args: tuple) -> None:
        acc.append(args[0].detach().double().reshape(-1, args[0].shape[-1]).square().sum(0))

    h = down.register_forward_pre_hook(record)
    with torch.no_grad():
        for ids in batches:
            model(ids)
    h.remove()
    score = down.weight.detach().double().norm(dim=0) * torch.stack(acc).sum(0).sqrt()
    return set(score.topk(keep).indices.tolist())


def test_calibration_is_carried_through_the_pruned_layers(tmp_path: Path) -> None:
    import copy

    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 96, s, generator=g) for s in [(1, 12), (2, 7), (1, 20)]]
    prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, calibration=batches)
    streamed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for i in range(3):
        hybrid = copy.deepcopy(model)  # the streamed layers before i, the original from i on
        for j in range(i):
            hybrid.model.layers[j] = streamed.model.layers[j]
        want = _channel_choice(hybrid, batches, i, 64)
        rows = {tuple(r.tolist()): j for j, r in enumerate(model.model.layers[i].mlp.up_proj.weight.detach())}
        got = {rows[tuple(r.tolist())] for r in streamed.model.layers[i].mlp.up_proj.weight.detach()}
        assert got == want, f"layer {i}: {len(got & want)} of 64 agree"
    assert _channel_choice(model, batches, 2, 64) != got  # the unpruned upstream would choose otherwise


def test_broken_folders_are_named(tmp_path: Path) -> None:
    model = _model("llama")
    model.save_pretrained(tmp_path / "in", max_shard_size="100KB")
    index = json.loads((tmp_path / "in" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    data = (tmp_path / "in" / shard).read_bytes()
    (tmp_path / "in" / shard).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError, match=shard):
        prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5)
    (tmp_path / "in" / shard).unlink()  # missing
    with pytest.raises(ModelLoadError, match=shard):
        prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".fxprune-*"))


def test_refusals_and_a_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ArgumentError, match="not an empty folder"):
        prune_pretrained(tmp_path / "in", tmp_path / "full", 0.5)
    with pytest.raises(ArgumentError, match="Taylor"):
        prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, importance=fxprune.Taylor([(_example()[0], None)]))
    import fxprune.streaming as streaming

    calls = {"n": 0}
    real = streaming._prune_layer

    def dies_at_the_second(*args, **kwargs):  # a kill part-way (KeyboardInterrupt, like SIGINT)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_prune_layer", dies_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".fxprune-*"))
    cfg = json.loads((tmp_path / "in" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "x.Model"}
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="remote code"):
        prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5)


def test_a_config_that_cannot_describe_the_layer_fails_after_the_first(tmp_path: Path) -> None:
    model = _model("gpt2")  # attention's inner width is derived from the hidden size by GPT-2's config
    model.save_pretrained(tmp_path / "in")
    seen = []
    with pytest.raises(FxPruneError, match="cannot describe the pruned layer transformer.h.0"):
        prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, on_layer=lambda i, n, r: seen.append(i))
    assert seen == [] and not (tmp_path / "out").exists()


def test_the_command_line_streams_what_python_streams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fxprune compile hf:FOLDER --data FILE --save-pretrained OUT`` streams by default and writes what
    ``prune_pretrained`` writes with the same batches; an option that needs the whole model loads it whole."""
    from fxprune.cli import main
    from fxprune.data import load_batches

    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return [x * i for i in range(10)]  # calibration text\n" * 8)
    assert main(["compile", f"hf:{tmp_path / 'in'}", "--ratio", "0.5", "--prune-heads", "--data", str(text),
                 "--save-pretrained", str(tmp_path / "cli")]) == 0
    assert "streamed layer by layer (3 layers, importance activation" in capsys.readouterr().out
    batches = load_batches(text, ((1, 32),), dtype=torch.int64, vocabulary=96)[:32]
    prune_pretrained(tmp_path / "in", tmp_path / "api", 0.5, prune_heads=True, calibration=batches)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "api")
    _same_weights(a, b)
    assert main(["compile", f"hf:{tmp_path / 'in'}", "--ratio", "0.5", "--save-pretrained", str(tmp_path / "whole"),
                 "--save-plan", str(tmp_path / "plan.json"), "--runs", "0"]) == 0
    assert "--save-plan need the whole model: it is loaded into memory" in capsys.readouterr().out


def test_reconstruct_streams_and_strict_writes_nothing(tmp_path: Path) -> None:
    """``reconstruct=True`` refits each layer on the batches that reach it (the streamed layers before it);
    the refitted model is closer to the original's logits than the plain one. ``--strict`` with a request
    that did nothing (every layer ignored: nothing pruned) writes nothing and exits 3."""
    from fxprune.cli import main

    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 96, (2, 24), generator=g) for _ in range(8)]
    plain = prune_pretrained(tmp_path / "in", tmp_path / "plain", 0.5, calibration=batches)
    refit = prune_pretrained(tmp_path / "in", tmp_path / "refit", 0.5, calibration=batches, reconstruct=True)
    assert plain.params_after == refit.params_after and all(p.oracle == "passed" for p in refit.parts)
    x = torch.randint(0, 96, (2, 24), generator=g)
    with torch.no_grad():
        want = model(x).logits
        errs = [(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)(x).logits - want).square().mean()
                for name in ("plain", "refit")]
    assert errs[1] < errs[0]
    every_layer = [a for i in range(3) for a in ("--ignore", f"model.layers.{i}")]
    code = main(["compile", f"hf:{tmp_path / 'in'}", "--ratio", "0.5", "--strict", "--save-pretrained",
                 str(tmp_path / "strict"), *every_layer])
    assert code == 3 and not (tmp_path / "strict").exists()


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """``kill -9`` leaves the hidden staging folder (no output folder); the next run beside it removes the
    folders of processes that have ended, and keeps those of live ones."""
    import os
    import subprocess
    import sys

    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".fxprune-{int(ended.stdout)}-abc123.tmp"
    live = tmp_path / f".fxprune-{os.getppid()}-def456.tmp"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5)
    assert not dead.exists() and live.exists() and (tmp_path / "out" / "config.json").is_file()


def test_a_streamed_refit_aims_at_the_unpruned_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each streamed layer is refitted on what the streamed layers before it give (its batches) toward what the
    unpruned model computes (its targets: the unpruned model's hidden states entering that layer), both checked
    against the eager models' own hidden states."""
    import fxprune.pipeline as pipeline

    seen: list[tuple[list, list | None]] = []
    real = pipeline.reconstruct

    def spy(gm, deps, plan, batches, runner=None, example=None, targets=None):  # noqa: ANN001, ANN202
        seen.append((list(batches), None if targets is None else list(targets)))
        return real(gm, deps, plan, batches, runner, example, targets)

    monkeypatch.setattr(pipeline, "reconstruct", spy)
    model = _model("llama")
    model.save_pretrained(tmp_path / "in")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 96, (2, 16), generator=g) for _ in range(3)]
    prune_pretrained(tmp_path / "in", tmp_path / "out", 0.5, calibration=batches, reconstruct=True, prune_heads=True)
    streamed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert len(seen) == 3 and all(t is not None and len(t) == len(b) == 3 for b, t in seen)
    with torch.no_grad():
        unpruned = [model(b, output_hidden_states=True).hidden_states for b in batches]
        pruned = [streamed(b, output_hidden_states=True).hidden_states for b in batches]
    for i, (got, targets) in enumerate(seen):
        for k in range(3):
            torch.testing.assert_close(targets[k][0], unpruned[k][i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[k][0], pruned[k][i], rtol=1e-4, atol=1e-5)
        if i:  # past the first layer the two differ: the refit makes up for what the layers before lost
            assert not torch.allclose(targets[0][0], got[0][0], atol=1e-3)
