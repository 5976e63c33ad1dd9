"""Real data for the command line's ``--data``: calibration, Taylor scores and int8 calibration.

``load_batches(path, shapes)`` reads, without running any code from the file:

- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``): resized to the input's height and width,
  scaled to [0, 1] and normalised with the ImageNet mean and spread;
- a ``.npy`` or ``.pt`` file holding one array (``torch.load(weights_only=True)``), with the input's shape
  apart from the batch dim (or a single sample);
- a text file (``.txt`` or anything else): its UTF-8 bytes as token ids 0-255, cut into sequences of the
  input's length (byte-level language models; a model with a tokenizer wants its own ids in a ``.pt`` file).
  A model whose vocabulary is smaller than 256 gets the ids modulo its vocabulary size (with a warning); an
  empty file or one that is not UTF-8 text (a binary file) is refused.

The samples are grouped into batches of the example input's batch size. Only single-input models are fed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fxprune.errors import ArgumentError, first_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_batches(path: str | Path, shapes: tuple[tuple[int, ...], ...], *, dtype: torch.dtype = torch.float32,
                 max_samples: int = 256, vocabulary: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Batches of real inputs shaped like ``shapes`` (one input), read from ``path``.

    Args:
        path: a folder of images, a ``.npy``/``.pt`` tensor file or a text file.
        shapes: the model's input shapes (one input); dim 0 is the batch size.
        dtype: the dtype of image and tensor samples.
        max_samples: read at most this many samples.
        vocabulary: a language model's vocabulary size: text byte ids are taken modulo it when it is
            smaller than 256 (None: ids 0-255 as they are).

    Raises:
        ArgumentError: the path is missing, holds nothing usable, or does not fit the input shape.
    """
    p = Path(path)
    if not p.exists():
        raise ArgumentError(f"--data {path}: no such file or folder")
    if len(shapes) != 1:
        raise ArgumentError(f"--data feeds single-input models; this one takes {len(shapes)} inputs")
    shape = shapes[0]
    if p.is_dir():
        samples = _images(p, shape, max_samples)
    elif p.suffix in (".npy", ".pt", ".pth"):
        samples = _array(p, shape, max_samples)
    else:
        samples = _text(p, shape, max_samples)
        dtype = torch.long
        if vocabulary is not None and vocabulary < 256:
            log.warning("--data %s: the model's vocabulary has %d ids, fewer than the 256 byte values; byte ids "
                        "are taken modulo %d (give a .pt file of the model's own token ids for real text)",
                        path, vocabulary, vocabulary)
            samples = [a % vocabulary for a in samples]
    batch = shape[0]
    if len(samples) < batch:
        raise ArgumentError(f"--data {path}: {len(samples)} samples, fewer than one batch of {batch}")
    out = []
    for i in range(0, len(samples) - batch + 1, batch):
        out.append((torch.as_tensor(np.stack(samples[i:i + batch])).to(dtype),))
    return out


def _images(folder: Path, shape: tuple[int, ...], limit: int) -> list[np.ndarray]:
    from PIL import Image

    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ArgumentError(f"--data {folder}: a folder of images feeds N x 1|3 x H x W inputs, not {shape}")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ArgumentError(f"--data {folder}: no {'/'.join(IMAGE_SUFFIXES)} images found")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if shape[1] == 3 else "L").resize((shape[3], shape[2]))
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as e:
            raise ArgumentError(f"--data {folder}: cannot read image {f} ({type(e).__name__}: {first_line(e)}); "
                                "remove it or fix it") from e
        a = (a - _MEAN) / _STD if shape[1] == 3 else (a[..., None] - 0.5) / 0.5
        out.append(a.transpose(2, 0, 1).astype(np.float32))
    return out


def _array(file: Path, shape: tuple[int, ...], limit: int) -> list[np.ndarray]:
    try:  # neither reader runs code from the file
        if file.suffix == ".npy":
            a = np.load(file, allow_pickle=False)
        else:
            t = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(t, torch.Tensor):
                raise ArgumentError(f"--data {file}: expected one tensor, found a {type(t).__name__}")
            a = t.numpy()
    except ArgumentError:
        raise
    except Exception as e:
        raise ArgumentError(f"--data {file}: cannot read it as a {file.suffix} tensor file ({type(e).__name__}: "
                            f"{first_line(e)}); save one array with np.save or torch.save") from e
    if tuple(a.shape) == tuple(shape[1:]):
        a = a[None]
    if tuple(a.shape[1:]) != tuple(shape[1:]):
        raise ArgumentError(f"--data {file}: samples of shape {tuple(a.shape[1:])}, the model takes {tuple(shape[1:])}")
    return list(a[:limit])


def _text(file: Path, shape: tuple[int, ...], limit: int) -> list[np.ndarray]:
    if len(shape) != 2:
        raise ArgumentError(f"--data {file}: a text file feeds N x L token inputs, the model takes {shape}")
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise ArgumentError(f"--data {file}: cannot read it ({e.strerror or e})") from e
    if not raw.strip():
        raise ArgumentError(f"--data {file}: the file is empty; give a UTF-8 text file, a .npy/.pt tensor file or "
                            "a folder of images")
    try:
        raw.decode("utf-8")
        binary = b"\x00" in raw
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise ArgumentError(f"--data {file}: not a UTF-8 text file (binary data?); give text, a .npy/.pt tensor "
                            "file (the suffix says which) or a folder of images")
    data = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    length = shape[1]
    n = min(limit, len(data) // length)
    if n == 0:
        raise ArgumentError(f"--data {file}: shorter than one sequence of {length} bytes")
    return [data[i * length:(i + 1) * length] for i in range(n)]
