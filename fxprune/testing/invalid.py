"""The fuzzer's "this spec does not fit" signal, shared by the op emitters (``netspec``, ``trust_ops``)."""

from __future__ import annotations


class InvalidNet(ValueError):
    """A spec whose shapes do not fit together (a generator proposal or a shrink candidate to discard)."""


def need(ok: bool, why: str) -> None:
    """Raise ``InvalidNet(why)`` unless ``ok``."""
    if not ok:
        raise InvalidNet(why)
