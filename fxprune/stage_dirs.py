"""Staging folders for all-or-nothing outputs, named by the process that writes them.

An output is written into a hidden folder beside its target and moved into place only when complete. A run
that is killed (``kill -9``, out of memory) cannot delete its folder, and a streamed 7B model leaves
gigabytes there; each new staging folder therefore first removes those of processes that no longer exist.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"^\.fxprune-(\d+)-[A-Za-z0-9_]+\.tmp$")


def make_stage(parent: str | os.PathLike[str]) -> Path:
    """A new hidden staging folder in ``parent`` (``.fxprune-PID-XXXX.tmp``), after removing the staging
    folders there whose process has ended.

    Raises:
        OSError: when ``parent`` cannot be written.
    """
    folder = Path(parent)
    for old in folder.glob(".fxprune-*.tmp"):
        m = _NAME.match(old.name)
        if m and old.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".fxprune-{os.getpid()}-", suffix=".tmp", dir=folder))


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one we may not signal counts as existing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True
