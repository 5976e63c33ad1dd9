"""What compiling one part of a model gives (``partial.compile_parts``' per-part compile): a typed outcome.

The walk over the parts reads no exception as a signal: the errors that say "not this part" become outcomes
once, where the pipeline is called (``outcome_of``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fxprune.errors import FxPruneError, TraceError


@dataclass(frozen=True)
class Pruned:
    """A part compiled: its ``PruneResult`` (``output="module"``, the part bound to its call)."""

    result: Any


@dataclass(frozen=True)
class Untraced:
    """A part that is not compiled as a whole (not traceable; in a replay, no plan of its own): its children are."""

    reason: str
    error: FxPruneError | None = None  # the trace's error, when there was one


@dataclass(frozen=True)
class Failed:
    """A part whose compile failed (its proof, its criterion, its recording): reported as kept whole, and its
    children are tried."""

    error: FxPruneError

    @property
    def reason(self) -> str:
        return f"{type(self.error).__name__}: {str(self.error)[:200]}"


PartOutcome = Pruned | Untraced | Failed


def outcome_of(compile_part: Callable[[], Any]) -> PartOutcome:
    """``compile_part()``'s result as a typed outcome: the errors that say "not this part" become outcomes
    here, at the call into the pipeline, so that no walker reads an exception as a signal."""
    try:
        return Pruned(compile_part())
    except TraceError as e:
        return Untraced(str(e), e)
    except FxPruneError as e:
        return Failed(e)
