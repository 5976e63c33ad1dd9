"""The command line on a Hugging Face model folder: ``hf:FOLDER`` in, ``--hidden``, ``--save-pretrained`` out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxprune.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A small random Llama saved with save_pretrained (weights and config)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                      max_position_embeddings=64)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def test_prunes_a_folder_with_hidden_size_and_saves_a_reloadable_folder(
        llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small"
    code = main(["compile", f"hf:{llama}", "--ratio", "0.5", "--hidden", "0.25", "--save-pretrained", str(out),
                 "--runs", "0"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "input 1x32" in text and "mask oracle: passed" in text
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    assert back.config.hidden_size == 48 and back.config.intermediate_size == 64
    assert sum(p.numel() for p in back.parameters()) < 0.6 * sum(p.numel() for p in original.parameters())
    ids = torch.randint(1, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert tokens.shape == (1, 12)
    assert not any(p.name.startswith(".fxprune-") for p in tmp_path.iterdir())  # nothing staged is left


def test_folder_errors_are_one_line(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", f"hf:{tmp_path / 'nowhere'}", "--runs", "0"]) == 2
    assert "config.json" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    assert main(["compile", f"hf:{llama}", "--save-pretrained", str(taken), "--runs", "0"]) == 2
    assert "exists" in capsys.readouterr().err and (taken / "x").read_text() == "mine"
    assert main(["compile", "models_zoo:resnet_basic", "--save-pretrained", str(tmp_path / "new"), "--runs", "0"]) == 2
    assert "save_pretrained" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["compile", f"hf:{llama}", "--hidden", "1.5", "--runs", "0"]) == 2
    assert "hidden" in capsys.readouterr().err
