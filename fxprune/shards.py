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
import shutil
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import ModelLoadError, first_line

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a folder's safetensors shards, read one at a time with plain file reads.

    No shard is memory-mapped: a mapped file's pages stay in the process's resident set once read, so a
    whole model read layer by layer would end up resident. Each ``get`` reads just that tensor's bytes.

    Raises:
        ModelLoadError: when the folder has no safetensors weights, the index names a missing file, or a
            shard's header cannot be read (naming the file).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
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
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # file -> (data start, tensor entries)
        for name in sorted(set(files.values()) or {SINGLE}):
            self._headers[name] = _read_header(self.folder / name)
        if not files:
            files = dict.fromkeys(self._headers[SINGLE][1], SINGLE)
        for name, (_, entries) in self._headers.items():  # every tensor the index names is in its file
            missing = sorted(k for k, f in files.items() if f == name and k not in entries)
            if missing:
                raise ModelLoadError(f"{self.folder / name}: does not hold {missing[:3]}, which the index places "
                                     "there; copy the whole folder again")
        self._files = files

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def get(self, key: str) -> torch.Tensor:
        """One tensor, in its stored dtype.

        Raises:
            ModelLoadError: naming the file when its data cannot be read (a truncated shard).
        """
        name = self._files[key]
        start, entries = self._headers[name]
        entry = entries[key]
        begin, end = (int(v) for v in entry["data_offsets"])
        dtype = _NAMED.get(entry["dtype"])
        path = self.folder / name
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {key} has dtype {entry['dtype']}, which fxprune does not stream")
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(memoryview(out.numpy()))
        if got != end - begin:
            raise ModelLoadError(f"{path}: tensor {key} is cut short ({got} of {end - begin} bytes); the file is "
                                 "damaged; copy it again")
        return out.view(dtype).reshape(entry["shape"])

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header only."""
        return tuple(self._headers[self._files[key]][1][key]["shape"])


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the tensor entries) of a safetensors file; ``ModelLoadError`` naming it."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: a weight file the index names is missing; copy the whole folder")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        entries = {k: v for k, v in dict(header).items() if k != "__metadata__"}
        longest = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({first_line(e)}); save the model again "
                             "with save_pretrained") from e
    if 8 + n + longest > size:
        raise ModelLoadError(f"{path}: the file is cut short ({size} bytes, its header needs {8 + n + longest}); "
                             "copy it again")
    return 8 + n, entries


class ShardWriter:
    """Write tensors to numbered safetensors shards as they come; ``close`` names them and writes the index.

    Each tensor's bytes go to disk when it is added (a shard's data file grows; nothing is kept in memory);
    a shard is closed by writing its safetensors header followed by that data.

    Args:
        folder: an existing (staging) folder the shards are written into.
        max_bytes: a shard is closed once it holds at least this many bytes (one tensor larger than it gets
            a shard of its own).
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int = 2 << 30) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._header: dict[str, Any] = {}
        self._data: Any = None  # the open data file of the shard being written
        self._offset = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, its keys)
        self._keys: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes to the current shard (closed once it is full)."""
        if key in self._keys:
            raise ValueError(f"tensor {key} written twice")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {key}: dtype {tensor.dtype} has no safetensors name")
        t = tensor.detach().contiguous()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self._written):05d}.data", "wb")  # noqa: SIM115
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(memoryview(raw))
        end = self._offset + t.nbytes
        self._header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, end]}
        self._offset = end
        self._keys.add(key)
        self.total_bytes += t.nbytes
        if self._offset >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        """Header, then the data file's bytes, into the shard's file; the data file goes."""
        if self._data is None:
            return
        self._data.close()
        data = Path(self._data.name)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-(8 + len(header)) % 8)  # the data starts 8-byte aligned
        name = f".shard-{len(self._written):05d}.tmp"
        with open(self.folder / name, "wb") as out, open(data, "rb") as src:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(src, out, 16 << 20)
        data.unlink()
        self._written.append((name, sorted(self._header)))
        self._header, self._data, self._offset = {}, None, 0

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


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_NAMED = {v: k for k, v in _DTYPES.items()}
