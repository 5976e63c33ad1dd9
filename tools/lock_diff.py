"""Print the installed packages whose versions differ from the lock file (for ``make test-latest``).

Usage: ``python tools/lock_diff.py requirements-lock.txt``. Exit status 0 always: the differences are a
report for whoever bumps the lock, the tests that follow decide whether the newest releases work.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def locked_versions(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a pip requirements file."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normal(name)] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    """Print one line per locked package whose installed version differs, and the packages not locked."""
    pins = locked_versions(Path(argv[1] if len(argv) > 1 else "requirements-lock.txt"))
    installed = {_normal(d.metadata["Name"]): d.version for d in metadata.distributions()}
    changed = [(n, pins[n], installed[n]) for n in sorted(pins) if n in installed and installed[n] != pins[n]]
    missing = sorted(n for n in pins if n not in installed)
    print(f"{len(changed)} package(s) differ from the lock:")
    for name, old, new in changed:
        print(f"  {name}: locked {old}, installed {new}")
    for name in missing:
        print(f"  {name}: locked {pins[name]}, not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
