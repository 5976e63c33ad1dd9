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
