"""``--data``: real inputs from image folders, tensor files and text, for Taylor scores and int8 calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fxprune.data import load_batches
from fxprune.errors import ArgumentError


def test_image_folder_becomes_normalised_batches(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    batches = load_batches(tmp_path, ((2, 3, 16, 16),))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 16, 16) and batches[0][0].dtype == torch.float32
    assert -3 < float(batches[0][0].min()) < 0 < float(batches[0][0].max()) < 3  # ImageNet-normalised


def test_tensor_files_and_text(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((7, 4), dtype=np.float32))
    assert len(load_batches(tmp_path / "x.npy", ((3, 4),))) == 2
    torch.save(torch.zeros(4, 4), tmp_path / "x.pt")
    assert load_batches(tmp_path / "x.pt", ((2, 4),))[1][0].shape == (2, 4)
    (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 10)
    ids = load_batches(tmp_path / "t.txt", ((2, 16),))
    assert ids[0][0].dtype == torch.long and int(ids[0][0][0, 0]) == ord("d")


@pytest.mark.parametrize(("make", "shape", "needle"), [
    (lambda p: np.save(p / "x.npy", np.ones((3, 5), dtype=np.float32)), ((1, 4),), "samples of shape"),
    (lambda p: (p / "t.txt").write_text("ab"), ((1, 16),), "shorter than one sequence"),
    (lambda p: None, ((1, 4),), "no such file"),
])
def test_bad_data_is_an_argument_error(tmp_path: Path, make: object, shape: tuple, needle: str) -> None:
    make(tmp_path)  # type: ignore[operator]
    target = next(iter(sorted(tmp_path.iterdir())), tmp_path / "missing.npy")
    with pytest.raises(ArgumentError, match=needle):
        load_batches(target, shape)


TINY_LM = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    """A byte-level language model: token ids in, N x L x 256 logits out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 256)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)
'''


@pytest.mark.parametrize("importance", ["activation", "taylor", "l2"])
def test_cli_prunes_a_language_model_on_token_ids_and_a_text_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], importance: str) -> None:
    """The command line gives a model with a token embedding token ids (not floats), and --data reads a text
    file as byte ids; activation and Taylor (next-token loss) importance score on it."""
    from fxprune.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lm.py").write_text(TINY_LM)
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    data = ["--data", "corpus.txt"] if importance != "l2" else []
    code = main(["compile", "lm.py:TinyLM", "--ratio", "0.5", "--importance", importance, *data,
                 "--save", "small.pt", "--runs", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "input 1x32" in out and "mask oracle: passed" in out
    small = torch.load(tmp_path / "small.pt", weights_only=False)
    assert small.up.out_features == 32
    with torch.no_grad():
        assert small(torch.randint(0, 256, (2, 7))).shape == (2, 7, 256)
