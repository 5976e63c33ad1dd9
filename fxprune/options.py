"""The options of ``fxprune.prune``, in one frozen record that is checked once, before any work."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fxprune.calibration import checked_batches
from fxprune.errors import ArgumentError
from fxprune.passes.importance import resolve
from fxprune.validate import check_hidden, check_output_path

log = logging.getLogger(__name__)


def check_ratio(ratio: Any, what: str = "ratio") -> float:
    """``ratio`` as a float in [0, 1), or ``ArgumentError`` naming ``what``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ArgumentError(f"{what} must be a number with 0 <= {what} < 1 (the fraction of channels removed), "
                            f"got {ratio!r}")
    return float(ratio)


@dataclass(frozen=True)
class Options:
    """Every option of ``fxprune.prune`` (see its docstring for what each one does)."""

    ratio: float = 0.5
    example_inputs: Any = None
    ignore: tuple[str | type, ...] = ()
    importance: Any = None  # None: "activation" when calibration is given, else "l2"
    calibration: Any = None
    global_ranking: bool = False
    target_macs: float | None = None
    target_params: float | None = None
    ratios: Mapping[str, float] | None = None
    group_ratios: Mapping[int, float] | None = None
    round_to: int | None = None
    min_channels: int = 1
    prune_heads: bool | str = False  # True: whole heads (a kv head with its query heads); "query": query heads
    leaves: tuple[str, ...] = ()
    verify: bool = False
    onnx: str | None = None
    onnx_opset: int = 18
    output: str = "graph"
    partial: bool = True
    hidden: float | None = None
    reconstruct: bool | str = False  # "bias": with biases the config can describe (fxprune/config_bias.py)
    pinned: tuple[tuple[str, int, str], ...] = ()  # internal: parameter dims kept whole (the hidden size's)
    # internal, a part's: what the unpruned model fed it, batch for batch with ``calibration`` (the refit's targets)
    reconstruct_targets: tuple[tuple[Any, ...], ...] | None = None

    @property
    def budget(self) -> bool:
        """Whether the ratio is searched to a MAC or parameter budget."""
        return self.target_macs is not None or self.target_params is not None

    def checked(self) -> Options:
        """The options with every value checked and normalised (tuples, floats).

        Raises:
            ArgumentError: naming the first bad option and what to pass instead.
        """
        check_output_path(self.onnx, "onnx")  # an unwritable output is found before the work, not after
        for key, r in {**(self.ratios or {}), **{str(k): v for k, v in (self.group_ratios or {}).items()}}.items():
            check_ratio(r, f"ratio for {key!r}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ArgumentError(f"round_to must be a positive integer, got {self.round_to!r}")
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ArgumentError(f"min_channels must be a positive integer, got {self.min_channels!r}")
        if self.prune_heads not in (False, True, "query") or not isinstance(self.prune_heads, (bool, str)):
            raise ArgumentError(f"prune_heads must be False, True (whole heads: a key/value head goes with its "
                                f"query heads) or 'query' (query heads inside every key/value group), got "
                                f"{self.prune_heads!r}")
        if self.output not in ("graph", "module"):
            raise ArgumentError(f"output must be 'graph' (a GraphModule) or 'module' (your own classes), "
                                f"got {self.output!r}")
        calibration = self.calibration
        if calibration is not None:  # read once (a generator), checked against the example inputs
            example = self.example_inputs
            example = (example,) if isinstance(example, torch.Tensor) else example
            calibration = checked_batches(calibration, tuple(example) if isinstance(example, (list, tuple)) else None)
        importance = self.importance
        if importance is None:  # data given: measured on it, not on the weights alone
            importance = "activation" if calibration is not None else "l2"
        criterion = resolve(importance, calibration)  # an unknown name, or one without its data, fails here
        if self.reconstruct not in (False, True, "bias") or not isinstance(self.reconstruct, (bool, str)):
            raise ArgumentError(f"reconstruct must be False, True or 'bias' (also add the biases a Hugging Face "
                                f"config can describe), got {self.reconstruct!r}")
        if self.reconstruct and calibration is None:
            raise ArgumentError("reconstruct=True refits the kept weights on data: pass calibration=<batches of "
                                "model inputs>")
        if calibration is not None and not getattr(criterion, "needs_activations", False) and not self.reconstruct:
            log.warning("fxprune: calibration= is not used by importance=%r; pass importance='activation' to "
                        "choose channels by what the batches carry", getattr(criterion, "__name__", importance))
        if isinstance(self.ignore, (str, type)) or isinstance(self.leaves, str):
            raise ArgumentError("ignore and leaves take a list of module names (or types), not a single one")
        hidden = None
        if self.hidden is not None:  # the hidden size (residual stream), pruned first: fxprune/hidden.py
            hidden = check_hidden(self.hidden)
            if self.budget:
                raise ArgumentError("hidden cannot be combined with target_macs or target_params: give a ratio")
        targets = self.reconstruct_targets
        if targets and calibration is not None:  # cast as the batches were
            targets = checked_batches(targets, tuple(example) if isinstance(example, (list, tuple)) else None,
                                      "reconstruct_targets")
        if not targets or calibration is None or len(targets) != len(calibration):
            targets = None  # not batch for batch: a part's refit targets what it computes on its own batches
        else:
            targets = tuple(t if isinstance(t, tuple) else (t,) for t in targets)
        return replace(self, ratio=check_ratio(self.ratio), ignore=tuple(self.ignore), leaves=tuple(self.leaves),
                       hidden=hidden, calibration=calibration, importance=importance, reconstruct_targets=targets)

    def part_options(self) -> Options:
        """The options a part of the model is pruned with (piecewise): its own module tree, no ONNX, proven
        as the user's own classes."""
        return replace(self, example_inputs=None, ignore=(), leaves=(), onnx=None, output="module", partial=True,
                       hidden=None, pinned=(),  # the whole model's residual stream, pruned before its parts
                       ratios=None, group_ratios=None,  # those name the root's modules and groups
                       calibration=None, reconstruct_targets=None)  # the root's batches: each part is given its own

    def calibration_batches(self) -> list[tuple[Any, ...]] | None:
        """The calibration batches as tuples of model inputs: ``calibration``, or those of an
        ``Activations`` criterion; None when the importance needs none."""
        batches = getattr(self.importance, "batches", None) if self.calibration is None else self.calibration
        wanted = self.reconstruct or getattr(resolve(self.importance, self.calibration), "needs_activations", False)
        if batches is None or not wanted:
            return None
        return [b if isinstance(b, tuple) else (b,) for b in batches]
