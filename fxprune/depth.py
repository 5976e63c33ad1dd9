"""Depth pruning: remove whole blocks (decoder layers) of a model, chosen by calibration loss (as SLEB does).

    r = fxprune.prune_depth(llama, 2, calibration=batches)   # two decoder layers fewer
    r.removed, r.loss_before, r.loss_after

Blocks are the members of the model's block list (``model.layers`` of a Hugging Face decoder, found as the
longest ``nn.ModuleList`` of one class; or named with ``blocks="model.layers"``). They are removed one at a
time, greedily: at each step every remaining block is tried out on a private copy and the one whose removal
raises the calibration loss least goes. A cosine "block influence" score (ShortGPT) ranks blocks by how little
they change their input, without trying any removal; issue 27 reports it choosing, on a small trained Llama,
a block whose removal cost +100% perplexity where the best single block cost +42%, so the loss itself decides
here (``benchmarks/llm_quality.py`` prints both choices on its model, docs/llm.md).

The result is a private copy with the chosen blocks deleted: the block list is renumbered, each attention's
``layer_idx`` and the Hugging Face config (``num_hidden_layers``, ``layer_types``) follow, so
``save_pretrained`` / ``from_pretrained`` and ``generate`` with the KV cache work. The caller's model is never
run or changed.

A model without a block list (a torchvision ResNet or ViT, whose blocks sit in ``nn.Sequential``s), or any
model with ``blocks="graph"``, goes to ``fxprune.depth_graph``: its residual units are found in the traced
FX graph, removed by the same greedy loss, and the result (a ``GraphDepthResult`` holding a GraphModule) is
proven equal, in float64, to the original with the removed residual branches zeroed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from fxprune.calibration import checked_batches
from fxprune.copying import private_copy
from fxprune.depth_common import Loss, next_token_loss, removal_count
from fxprune.errors import ArgumentError
from fxprune.metrics import count_params
from fxprune.partial import no_kv_cache
from fxprune.state import kept_buffers

if TYPE_CHECKING:
    from fxprune.depth_graph import GraphDepthResult

log = logging.getLogger(__name__)

GRAPH = "graph"  # blocks=GRAPH: the residual units of the traced graph (fxprune.depth_graph)


@dataclass(frozen=True)
class DepthResult:
    """What ``prune_depth`` did.

    Attributes:
        model: the private copy with the blocks removed.
        blocks: the name of the block list (``model.layers``).
        removed: the original indices of the removed blocks, in the order they were chosen.
        loss_before: the calibration loss of the model.
        loss_after: the calibration loss of the result.
        steps: for each removal, ``(original index, loss)`` of every block tried at that step.
        params_before: parameters of the model.
        params_after: parameters of the result.
    """

    model: nn.Module
    blocks: str
    removed: tuple[int, ...]
    loss_before: float
    loss_after: float
    steps: tuple[tuple[tuple[int, float], ...], ...]
    params_before: int
    params_after: int


def find_blocks(model: nn.Module, name: str | None = None) -> str:
    """The name of the model's block list: ``name`` when given (checked), else the longest ``nn.ModuleList``
    whose members are all of one class with parameters.

    Raises:
        ArgumentError: ``name`` is not a ``nn.ModuleList`` of the model, or no block list is found.
    """
    if name is not None:
        found = dict(model.named_modules()).get(name)
        if not isinstance(found, nn.ModuleList) or not len(found):
            raise ArgumentError(f"blocks={name!r} is not a non-empty nn.ModuleList of {type(model).__name__}")
        return name
    best, size = None, 0
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > size and len({type(c) for c in m}) == 1 \
                and next(m.parameters(), None) is not None:
            best, size = n, len(m)
    if best is None:
        raise ArgumentError(f"{type(model).__name__} has no list of blocks (an nn.ModuleList of one class): "
                            "name it with blocks='model.layers'")
    return best


def _has_block_list(model: nn.Module) -> bool:
    if not isinstance(model, nn.Module):
        return False  # the graph version's check names what was passed
    try:
        find_blocks(model)
    except ArgumentError:
        return False
    return True


def prune_depth(model: nn.Module, remove: float, *, calibration: Sequence[Any], loss_fn: Loss | None = None,
                blocks: str | None = None, example_inputs: Any = None) -> DepthResult | GraphDepthResult:
    """Remove ``remove`` blocks (a count, or a fraction of the blocks) of ``model``, chosen greedily by the
    calibration loss of each removal.

    Args:
        model: the model (only read: the result is a private copy).
        remove: how many blocks go (an int), or which fraction of them (a float in (0, 1)).
        calibration: batches of model inputs (a tensor or a tuple of positional tensors each).
        loss_fn: ``(output, batch) -> scalar loss``; default the next-token loss of a causal language model
            (for the graph version, the relative squared error to the unpruned output on other models).
        blocks: the name of the block list (default: found, ``find_blocks``), or ``"graph"`` for the residual
            units of the traced graph (the default when the model has no block list: ``fxprune.depth_graph``).
        example_inputs: the model's inputs, to check the batches against (default: the first batch).

    Raises:
        ArgumentError: a bad count, no block list or residual unit, or batches that do not fit.
    """
    if blocks == GRAPH or (blocks is None and not _has_block_list(model)):
        from fxprune.depth_graph import prune_graph_depth

        return prune_graph_depth(model, remove, calibration=calibration, loss_fn=loss_fn,
                                 example_inputs=example_inputs)
    batches = checked_batches(calibration, None if example_inputs is None else
                              (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    batches = tuple(b if isinstance(b, tuple) else (b,) for b in batches)
    loss_fn = loss_fn or next_token_loss
    name = find_blocks(model, blocks)
    work = private_copy(model).eval()
    parent_name, _, attr = name.rpartition(".")
    parent = work.get_submodule(parent_name) if parent_name else work
    original = list(getattr(parent, attr))
    count = removal_count(remove, len(original))
    keep = list(range(len(original)))

    def loss_of(indices: list[int]) -> float:
        setattr(parent, attr, nn.ModuleList([original[i] for i in indices]))
        total = 0.0
        with torch.no_grad(), kept_buffers(work), no_kv_cache(work):
            for batch in batches:
                total += float(loss_fn(work(*batch), batch))
        return total / len(batches)

    before = loss_of(keep)
    steps, removed = [], []
    for _ in range(count):
        tried = tuple((i, loss_of([j for j in keep if j != i])) for i in keep)
        best = min(tried, key=lambda t: t[1])[0]
        steps.append(tried)
        removed.append(best)
        keep.remove(best)
        log.info("fxprune: depth: block %s.%d removed (calibration loss %.4g)", name, best, dict(tried)[best])
    after = loss_of(keep)
    _renumber(work, parent, attr, original, keep)
    work.train(model.training)
    return DepthResult(work, name, tuple(removed), before, after, tuple(steps), count_params(model),
                       count_params(work))


def _renumber(work: nn.Module, parent: nn.Module, attr: str, original: list[nn.Module], keep: list[int]) -> None:
    """The kept blocks as the block list, with their ``layer_idx`` attributes and the config following."""
    setattr(parent, attr, nn.ModuleList([original[i] for i in keep]))
    for new, old in enumerate(keep):
        for m in original[old].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    configs = {id(c): c for m in work.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "num_hidden_layers")}
    for config in configs.values():
        if config.num_hidden_layers == len(original):
            config.num_hidden_layers = len(keep)
            types = getattr(config, "layer_types", None)
            if isinstance(types, list) and len(types) == len(original):
                config.layer_types = [types[i] for i in keep]
