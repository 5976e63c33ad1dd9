"""Frozen records of an analysis: coupled channel groups and the pruning plan chosen for them.

A ``PruningPlan`` saves to JSON (groups, kept channel positions, a fingerprint of the traced graph and the
library versions) and replays on a fresh instance of the same model with ``fxprune.apply``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fxprune.errors import ArgumentError, PlanMismatchError

PLAN_FORMAT = "fxprune-plan/1"


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that must be pruned together, and everything they touch.

    Attributes:
        id: position of the group in the analysis (deterministic).
        size: number of channel classes (the unit a ratio counts).
        producers: parameter dims that create these channels, e.g. ``layer1.0.conv1.weight[0]``.
        members: every parameter dim sliced when a channel of the group is removed.
        n_pinned: classes that must be kept, with the reasons in ``pin_reasons``.
        pin_reasons: distinct reasons, first seen first.
    """

    id: int
    size: int
    producers: tuple[str, ...]
    members: tuple[str, ...]
    n_pinned: int
    pin_reasons: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        """Whether at least one channel of the group may be removed."""
        return self.n_pinned < self.size and self.size > 1

    @property
    def reason(self) -> str:
        """Why the group cannot be pruned ("" when it can)."""
        if self.prunable:
            return ""
        if self.size <= 1:
            return "a single channel: pruning it would empty the layer"
        return self.pin_reasons[0] if self.pin_reasons else "pinned"


@dataclass(frozen=True)
class PruningPlan:
    """Which channel classes of each group are kept.

    Attributes:
        ratio: the fraction of channels removed per prunable group that was applied.
        groups: the analysed groups.
        kept: per group, the kept positions in the group's canonical class order.
        dropped_labels: class labels removed (sorted), as used by the rewrite and the oracle.
        fingerprint: hash of the traced graph the plan was computed on ("" when unknown).
        versions: library versions that produced the plan.
        prune_heads: the plan removes whole attention heads (True) or query heads inside key/value groups
            ("query"); replay analyses the model the same way.
        inputs: shape and dtype of every example input the plan was computed with; ``fxprune.apply`` makes
            inputs of these when it is given none (the fingerprint depends on the shapes).
        hidden: with ``prune(hidden=...)``, the kept hidden channels of each stream (the residual stream
            first); replayed before the groups, which were planned on the model of that hidden size.
        pieces: submodules pruned by choices this plan does not hold (fused mixture-of-experts modules, expert
            by expert): ``fxprune.apply`` refuses the plan.
        parts: the plan of every part compiled on its own (piecewise: inside opaque modules, or every part of an
            untraceable root), by the part's qualified name; ``fxprune.apply`` replays each on its part.
        kept_whole: modules a write-back kept whole (their own forward reads a size fxprune cannot rewrite):
            a replay keeps them whole too, so it traces the same groups.
        specialize: the graph was traced with branches on shapes following the example inputs (as
            ``output="module"`` does); a replay traces the same way.
    """

    ratio: float
    groups: tuple[ChannelGroup, ...]
    kept: tuple[tuple[int, ...], ...]
    dropped_labels: tuple[int, ...]
    fingerprint: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    prune_heads: bool | str = False
    inputs: tuple[tuple[tuple[int, ...], str], ...] = ()
    hidden: tuple[tuple[int, ...], ...] = ()
    pieces: tuple[str, ...] = ()
    parts: tuple[tuple[str, PruningPlan], ...] = ()
    kept_whole: tuple[str, ...] = ()
    specialize: bool = False

    @property
    def n_dropped(self) -> int:
        """Number of channel classes removed in total."""
        return len(self.dropped_labels)

    def dropped_mask(self, n_classes: int) -> np.ndarray:
        """Boolean mask over class labels, True where the class is removed."""
        mask = np.zeros(n_classes, dtype=bool)
        mask[list(self.dropped_labels)] = True
        return mask

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (class labels are not stored: they are recomputed on replay)."""
        return {
            "format": PLAN_FORMAT,
            "fingerprint": self.fingerprint,
            "versions": dict(self.versions),
            "ratio": self.ratio,
            "prune_heads": self.prune_heads,
            "inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in self.inputs],
            "hidden": [list(k) for k in self.hidden],
            "pieces": list(self.pieces),
            "parts": [{"name": n, "plan": p.to_dict()} for n, p in self.parts],
            "kept_whole": list(self.kept_whole),
            "specialize": self.specialize,
            "groups": [
                {**asdict(g), "kept": list(k)} for g, k in zip(self.groups, self.kept, strict=True)
            ],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (diffable: one group per entry, sorted keys)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> PruningPlan:
        """Read a plan written by ``to_dict``; labels are filled in by ``fxprune.apply``.

        Raises:
            PlanMismatchError: ``data`` is not an fxprune plan, or a field is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise PlanMismatchError(f"not an fxprune plan: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanMismatchError(f"not an fxprune plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        try:
            return PruningPlan._from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise PlanMismatchError(
                f"malformed fxprune plan ({what}); write plans with PruningPlan.save and do not edit their "
                "structure"
            ) from e

    @staticmethod
    def _from_dict(data: dict[str, Any]) -> PruningPlan:
        groups, kept = [], []
        if not isinstance(data["groups"], list):
            raise TypeError(f"'groups' must be a list, got {type(data['groups']).__name__}")
        for g in data["groups"]:
            raw = g["kept"]
            size = _integer(g["size"], "group size", low=0)
            kept.append(_indices(raw, f"kept channels of group {g.get('id')!r}", size))
            groups.append(ChannelGroup(
                id=_integer(g["id"], "group id", low=0), size=size, producers=tuple(g["producers"]),
                members=tuple(g["members"]), n_pinned=_integer(g["n_pinned"], "n_pinned", low=0),
                pin_reasons=tuple(g["pin_reasons"]),
            ))
        ratio = data["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
        return PruningPlan(float(ratio), tuple(groups), tuple(kept), (),
                           str(data.get("fingerprint", "")), dict(data.get("versions", {})),
                           _heads(data.get("prune_heads", False)),
                           tuple((tuple(_integer(d, "input size", low=0) for d in i["shape"]), str(i["dtype"]))
                                 for i in data.get("inputs", [])),
                           tuple(_indices(k, f"kept hidden channels of stream {j}", None)
                                 for j, k in enumerate(data.get("hidden", []))),
                           tuple(str(n) for n in data.get("pieces", [])),
                           tuple((str(p["name"]), PruningPlan._from_dict(p["plan"])) for p in data.get("parts", [])),
                           tuple(str(n) for n in data.get("kept_whole", [])),
                           _flag(data.get("specialize", False), "specialize"))

    def example_inputs(self) -> tuple[Any, ...] | None:
        """Seeded inputs of the recorded shapes and dtypes (None when the plan recorded none).

        Floating inputs are standard normal; integer inputs (token ids) are zeros; booleans are True.
        """
        if not self.inputs:
            return None
        import torch

        gen = torch.Generator().manual_seed(0)
        out = []
        for shape, dtype in self.inputs:
            dt = getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(dt, torch.dtype):
                raise PlanMismatchError(f"the plan records an input of unknown dtype {dtype!r}")
            if dt.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(dt))
            elif dt == torch.bool:
                out.append(torch.ones(shape, dtype=dt))
            else:
                out.append(torch.zeros(shape, dtype=dt))
        return tuple(out)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> PruningPlan:
        """Read a plan saved with ``save``.

        Raises:
            ArgumentError: there is no readable file at ``path``.
            PlanMismatchError: the file is not JSON, or not an fxprune plan.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentError(f"a plan path must be a str or os.PathLike, got {type(path).__name__}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError as e:
            raise ArgumentError(f"plan file not found: {os.fspath(path)}; pass the path written by "
                                "plan.save(path)") from e
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, binary content
            raise ArgumentError(f"cannot read plan file {os.fspath(path)} ({type(e).__name__}); pass the "
                                "JSON file written by plan.save(path)") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanMismatchError(f"{os.fspath(path)} is not a JSON file ({e}); pass the file written by "
                                    "plan.save(path)") from e
        return PruningPlan.from_dict(data)


def _integer(value: Any, what: str, low: int | None = None) -> int:
    """``value`` if it is a JSON integer (not a bool, not 4.5, not "4") of at least ``low``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{what} must be at least {low}, got {value}")
    return value


def _indices(values: Any, what: str, size: int | None) -> tuple[int, ...]:
    """Distinct integer channel indices in ``[0, size)`` (any non-negative bound when ``size`` is None)."""
    if not isinstance(values, list):
        raise ValueError(f"{what} must be a list of integers, got {type(values).__name__}")
    out = tuple(_integer(v, what, low=0) for v in values)
    if size is not None and any(v >= size for v in out):
        raise ValueError(f"{what} must be below the group size {size}, got {max(out)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} repeat a channel")
    return out


def _heads(value: Any) -> bool | str:
    if value == "query":
        return "query"
    return _flag(value, "prune_heads")


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def input_specs(inputs: tuple[Any, ...]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Shape and dtype of every tensor input (what a replay needs to rebuild the same graph)."""
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return ()
    return tuple((tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs)


def versions() -> dict[str, str]:
    """The library versions a plan records."""
    from fxprune import __version__

    return {"fxprune": __version__, "torch": torch.__version__}
