"""Reading and writing a Hugging Face folder's safetensors shards one tensor at a time.

``Checkpoint`` opens a folder's shards lazily (``model.safetensors``, or the shards its
``model.safetensors.index.json`` names) and hands out tensors by name in their stored dtype, so a caller
holds only what it asked for. ``ShardWriter`` takes tensors as they are produced and writes them to shards of
at most ``max_bytes`` each, named and indexed as ``save_pretrained`` names them when it is closed. Both
raise ``ModelLoadError`` naming the file when a shard is missing or unreadable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import ModelLoadError, first_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a folder's safetensors shards, read one at a time.

    Raises:
        ModelLoadError: when the folder has no safetensors weights, the index names a missing file, or a
            shard's header cannot be read (naming the file).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = {str(k): str(v) for k, v in dict(weight_map).items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index}: not a readable shard index ({first_line(e)})") from e
        elif (self.folder / SINGLE).is_file():
            files = {}
        else:
            raise ModelLoadError(f"{self.folder}: no {SINGLE} or {INDEX} (streaming reads safetensors weights); "
                                 "save the model with save_pretrained, or use the in-memory path")
        self._handles: dict[str, Any] = {}
        for name in sorted(set(files.values()) or {SINGLE}):
            path = self.folder / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: a weight file the index names is missing; copy the whole folder")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
                raise ModelLoadError(f"{path}: not a readable safetensors file ({first_line(e)}); save the model "
                                     "again with save_pretrained") from e
        if not files:
            files = dict.fromkeys(self._handles[SINGLE].keys(), SINGLE)
        for name, handle in self._handles.items():  # every tensor the index names is in its file
            missing = sorted(k for k, f in files.items() if f == name and k not in set(handle.keys()))
            if missing:
                raise ModelLoadError(f"{self.folder / name}: does not hold {missing[:3]}, which the index places "
                                     "there; copy the whole folder again")
        self._files = files

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def files(self) -> list[str]:
        """The weight files read (names relative to the folder)."""
        return sorted(self._handles)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, in its stored dtype.

        Raises:
            ModelLoadError: naming the file when its data cannot be read (a truncated shard).
        """
        name = self._files[key]
        try:
            return self._handles[name].get_tensor(key)
        except Exception as e:  # noqa: BLE001 - SafetensorError on truncated data
            raise ModelLoadError(f"{self.folder / name}: tensor {key} cannot be read ({first_line(e)}); the file "
                                 "is damaged; copy it again") from e

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header only."""
        return tuple(self._handles[self._files[key]].get_slice(key).get_shape())

    def nbytes(self) -> int:
        """The size of the weight files on disk."""
        return sum((self.folder / name).stat().st_size for name in self._handles)


class ShardWriter:
    """Write tensors to numbered safetensors shards as they come; ``close`` names them and writes the index.

    Args:
        folder: an existing (staging) folder the shards are written into.
        max_bytes: a shard is closed once it holds at least this many bytes (one tensor larger than it gets
            a shard of its own).
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = 2 << 30) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, its keys)
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (a private contiguous copy when it is a view); a full shard is written now."""
        if key in self._pending or any(key in keys for _, keys in self._written):
            raise ValueError(f"tensor {key} written twice")
        t = tensor.detach()
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()
        self._pending[key] = t
        self._pending_bytes += t.nbytes
        self.total_bytes += t.nbytes
        if self._pending_bytes >= self.max_bytes:
            self._flush()

    def add_all(self, items: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Queue every (name, tensor) pair."""
        for key, t in items:
            self.add(key, t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        name = f".shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._written.append((name, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is queued, give the shards their final names and write the index (several shards).

        Returns:
            The weight file names written.
        """
        self._flush()
        n = len(self._written)
        if n == 1:
            os.replace(self.folder / self._written[0][0], self.folder / SINGLE)
            return [SINGLE]
        weight_map: dict[str, str] = {}
        names = []
        for i, (tmp, keys) in enumerate(self._written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [*names, INDEX]
