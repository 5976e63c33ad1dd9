"""All-or-nothing output files: stage every output beside its target, move them into place at the end."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

from fxprune.errors import ArgumentError
from fxprune.stage_dirs import make_stage

__all__ = ["OutputStage"]


class OutputStage:
    """Hand out staging paths for output files and move them all into place on :meth:`commit`.

    Each target directory gets one hidden temporary directory inside it (so the final ``os.replace`` never
    crosses a file system). Leaving the ``with`` block without a commit deletes everything staged.

    Example:
        >>> with OutputStage() as stage:  # doctest: +SKIP
        ...     write(stage.path("out.onnx"))
        ...     stage.commit()
    """

    def __init__(self) -> None:
        self._dirs: dict[Path, Path] = {}
        self._targets: dict[Path, Path] = {}

    def check(self, target: str | os.PathLike[str], flag: str) -> Path:
        """Validate an output path before any work is done: its folder exists and takes a staging folder.

        Raises:
            ArgumentError: If the folder does not exist or cannot be written, the path is a folder, or two
                outputs collide.
        """
        path = Path(target)
        if path.is_dir():
            raise ArgumentError(f"{flag} {target} is a folder; give a file name")
        return self._target(path, flag)

    def check_folder(self, target: str | os.PathLike[str], flag: str) -> Path:
        """Validate an output folder (written whole, as ``save_pretrained`` does) before any work is done.

        Raises:
            ArgumentError: If its parent does not exist or cannot be written, or it exists and is not an empty
                folder (fxprune never writes into, or replaces, a folder that holds files).
        """
        path = Path(target)
        if path.exists() and not path.is_dir():
            raise ArgumentError(f"{flag} {target} is a file; give a new (or empty) folder")
        if path.is_dir() and any(path.iterdir()):
            raise ArgumentError(f"{flag} {target} exists and is not empty; give a new (or empty) folder, or "
                                "delete it first")
        return self._target(path, flag)

    def _target(self, path: Path, flag: str) -> Path:
        if not path.parent.resolve().is_dir():
            raise ArgumentError(f"{flag} {path}: folder {path.parent} does not exist; create it or give another path")
        resolved = path.resolve()
        if resolved in self._targets.values():
            raise ArgumentError(f"{flag} {path} names a file another option writes too")
        try:  # the staging folder is made now: a folder that cannot be written fails before any work
            self.path(path)
        except OSError as e:
            raise ArgumentError(f"{flag} {path}: cannot write in folder {path.parent} ({e.strerror or e}); "
                                "give a writable path") from e
        self._targets[path] = resolved
        return path

    def path(self, target: str | os.PathLike[str]) -> Path:
        """The staging path whose file becomes ``target`` on commit (siblings written there move too)."""
        final = Path(target)
        folder = final.parent.resolve()
        if folder not in self._dirs:
            self._dirs[folder] = make_stage(folder)  # a killed run's folders there are removed first
        return self._dirs[folder] / final.name

    def commit(self) -> list[Path]:
        """Move every staged file into its target folder; return the final paths."""
        moved = []
        for folder, stage in self._dirs.items():
            for f in sorted(stage.iterdir()):
                if f.is_file() or (f.is_dir() and (folder / f.name) in self._targets.values()):
                    os.replace(f, folder / f.name)  # a folder replaces only a checked, empty one
                    moved.append(folder / f.name)
        self.discard()
        return moved

    def discard(self) -> None:
        """Delete the staging directories and everything in them."""
        for stage in self._dirs.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._dirs.clear()

    def __enter__(self) -> OutputStage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()
