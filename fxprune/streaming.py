"""Prune a Hugging Face folder layer by layer, streaming its safetensors shards: the model is never whole.

``prune_pretrained(folder, save_to, ratio)`` builds the model's skeleton on the meta device from its config,
makes real only the modules before the decoder layers (embeddings, rotary tables), records how every layer
is called on the example and calibration inputs, and then, for one layer at a time: loads its tensors,
prunes it with the same per-part compile as the in-memory path (importance, selection, rewrite, oracle),
runs the calibration activations through the pruned layer (what the next layer will see), writes its tensors
to the output shards and frees it. Tensors outside the layers (embeddings, final norm, head) are copied
verbatim. The config is rewritten to the pruned widths (proven on the meta skeleton and on the last layer),
tokenizer files are copied, and the folder appears whole or not at all.

Peak memory is about one layer a few times over (its copy, the rewrite, the oracle), plus the calibration
activations: independent of the number of layers.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fxprune import honoured
from fxprune.errors import ArgumentError, FxPruneError, first_line
from fxprune.hf_config import _same_structure, propose
from fxprune.options import Options
from fxprune.outputs import tensors_of
from fxprune.part_outcomes import Pruned
from fxprune.partial import (
    PartReport,
    _Bound,
    _Call,
    _part_ignore,
    fed_batches,
    no_kv_cache,
    oracle_verdict,
)
from fxprune.passes.importance import resolve
from fxprune.pipeline import _part_compiler
from fxprune.shards import ShardWriter
from fxprune.stage_dirs import make_stage
from fxprune.streaming_model import Skeleton, hidden_of, is_parameter, open_skeleton

log = logging.getLogger(__name__)

DEFAULT_TOKENS = (1, 32)  # the example input when none is given: one sequence of 32 token ids


@dataclass(frozen=True)
class StreamResult:
    """What ``prune_pretrained`` wrote.

    Attributes:
        folder: the output folder (``save_pretrained`` layout).
        params_before: parameters of the input checkpoint (tied tensors once).
        params_after: parameters written.
        parts: one report per decoder layer (pruned with its oracle verdict, or kept whole with the reason).
        config_changes: the config fields rewritten to the pruned widths.
        files: the files written into ``folder``.
        seconds: wall time.
        unhonoured: requests that had no effect (also logged as warnings).
    """

    folder: Path
    params_before: int
    params_after: int
    parts: tuple[PartReport, ...]
    config_changes: dict[str, Any]
    files: tuple[str, ...]
    seconds: float
    unhonoured: tuple[str, ...] = field(default=())


def prune_pretrained(
    folder: str | os.PathLike[str],
    save_to: str | os.PathLike[str],
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    importance: Any = None,
    prune_heads: bool = False,
    round_to: int | None = None,
    min_channels: int = 1,
    ignore: tuple[str | type, ...] | list[str | type] = (),
    reconstruct: bool = False,
    verify: bool = True,
    max_shard_bytes: int = 2 << 30,
    on_layer: Callable[[int, int, PartReport], None] | None = None,
) -> StreamResult:
    """Prune the Hugging Face model saved in ``folder`` one decoder layer at a time and save it to ``save_to``.

    The options mean what they mean for ``fxprune.prune`` (each decoder layer is pruned as a part, with the
    same per-part compile); calibration batches are token-id tensors (or tuples of the model's inputs), and
    each layer is measured (and, with ``reconstruct``, refitted) on what the layers pruned before it give.
    Options that need the whole model at once (budgets, global ranking, the hidden size, Taylor importance,
    ONNX) are refused: use ``fxprune.prune`` on a loaded model for those.

    Args:
        folder: a folder ``save_pretrained`` wrote, with safetensors weights; never modified.
        save_to: a new (or empty) folder; written whole or not at all.
        ratio: fraction of the channels of every coupled group removed, in [0, 1).
        example_inputs: the inputs each layer's call is recorded with (default: 32 seeded token ids).
        calibration: batches of model inputs; default criterion activation-aware when given.
        importance: a criterion name or object (not gradient-based).
        prune_heads: remove whole attention heads.
        round_to: keep channel counts multiples of this.
        min_channels: keep at least this many channels per group.
        ignore: module names (full, as in the loaded model) or types kept whole.
        reconstruct: refit the kept weights of each layer by least squares on the calibration batches.
        verify: prove each pruned layer by the mask oracle.
        max_shard_bytes: the size at which an output shard is closed.
        on_layer: called with (layer number from 1, number of layers, its report) after each layer is written.

    Returns:
        A ``StreamResult``.

    Raises:
        ArgumentError: a bad or unsupported option, or an output folder that exists and is not empty.
        ModelLoadError: a missing or unreadable shard or config (naming the file).
        FxPruneError: a model whose parts cannot be streamed, or whose pruned widths its config cannot describe.
    """
    t0 = time.perf_counter()
    target = _check_target(save_to)
    skeleton = open_skeleton(folder)
    if example_inputs is None:
        gen = torch.Generator().manual_seed(0)
        example_inputs = (torch.randint(0, skeleton.vocabulary, DEFAULT_TOKENS, generator=gen),)
    options = Options(ratio=ratio, example_inputs=example_inputs, ignore=tuple(ignore), importance=importance,
                      calibration=calibration, round_to=round_to, min_channels=min_channels, prune_heads=prune_heads,
                      verify=verify, output="module", reconstruct=reconstruct).checked()
    if reconstruct == "bias":
        raise ArgumentError("reconstruct='bias' changes the config of every layer before pruning; streaming "
                            "prunes one layer at a time: use reconstruct=True, or the in-memory path")
    criterion = resolve(options.importance, options.calibration)
    if getattr(criterion, "needs_grad", False):
        raise ArgumentError("a gradient-based importance (Taylor) needs the whole model's loss: streaming prunes one "
                            "layer at a time; use 'activation' with calibration, or the in-memory path")
    honoured.warn_weight_only_language_model(skeleton.model, options)
    _large_allocations_mapped()
    stage = make_stage(target.parent)  # all or nothing; a killed run's staging folders there go first
    try:
        result = _stream(skeleton, options, stage, max_shard_bytes, on_layer)
        if target.is_dir():
            target.rmdir()  # checked empty above
        os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return replace(result, folder=target, seconds=time.perf_counter() - t0)


def _large_allocations_mapped() -> None:
    """glibc: serve allocations of 16 MiB and more from their own memory maps, always.

    glibc raises its map threshold each time a large block is freed, after which blocks of a layer's size
    come from the heap, which fragments and is not given back: at 7B, one layer's work then peaks at 3.6 GiB
    of RSS instead of 2.6. Fixing the threshold turns that off; one arena keeps torch's compute threads from
    each holding freed memory of their own (at 1.1B the peak varied from 1.2 to 1.7 GiB between identical
    runs). Process-wide; elsewhere than glibc, nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
            libc.mallopt(-8, 1)  # M_ARENA_MAX: the compute threads' arenas each kept up to 0.6 GiB freed at 1.1B
    except OSError:  # no C library to ask: the default allocator behaviour
        pass


def _check_target(save_to: str | os.PathLike[str]) -> Path:
    """``save_to`` as a path: a new folder, or an empty one, in a folder that exists (``ArgumentError``)."""
    target = Path(save_to)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ArgumentError(f"save_to {target} exists and is not an empty folder; give a new folder")
    if not target.parent.resolve().is_dir():
        raise ArgumentError(f"save_to {target}: folder {target.parent} does not exist")
    return target


def _stream(sk: Skeleton, options: Options, stage: Path, max_shard_bytes: int,
            on_layer: Callable[[int, int, PartReport], None] | None) -> StreamResult:
    """Record the layers' calls, prune and write layer by layer, copy the rest, write the config and files."""
    batches = options.calibration_batches()
    example = tuple(options.example_inputs) if isinstance(options.example_inputs, (tuple, list)) \
        else (options.example_inputs,)
    with no_kv_cache(sk.model):
        calls = sk.record(example)
        cal_calls = [sk.record(b) for b in batches] if batches is not None else None
    sk.release_base()  # embeddings and the like: the recorded calls hold what the layers need
    compile_part, _, _ = _part_compiler(options)
    writer = ShardWriter(stage, max_shard_bytes)
    reports: list[PartReport] = []
    hidden = hidden_of(calls[0])
    cal_hidden = [hidden_of(c[0]) for c in cal_calls or ()]
    unpruned = list(cal_hidden) if options.reconstruct else None  # the unpruned model's: the refit's targets
    params_after, last = 0, None
    n = len(sk.layers)
    for i in range(n):
        name = f"{sk.layers_name}.{i}"
        layer = sk.load_layer(i)
        call = _with_hidden(calls[i], hidden)
        own = None if cal_calls is None else [_with_hidden(c[i], h) for c, h in zip(cal_calls, cal_hidden, strict=True)]
        targets = None
        if unpruned is not None and cal_calls is not None:  # the unpruned layer on the unpruned model's states
            targets = [_with_hidden(c[i], h) for c, h in zip(cal_calls, unpruned, strict=True)]
            with torch.no_grad():
                unpruned = [_layer_output(layer, t, name) for t in targets]
        pruned, report = _prune_layer(layer, name, call, own, options, compile_part, targets)
        reports.append(report)
        with torch.no_grad():  # what the next layer sees: the pruned layer's outputs
            hidden = _layer_output(pruned, call, name)
            cal_hidden = [_layer_output(pruned, c, name) for c in own or ()]
        state = pruned.state_dict()
        for key, t in state.items():
            writer.add(f"{name}.{key}", t)
        params_after += sum(p.numel() for p in pruned.parameters())
        log.info("fxprune: layer %d/%d %s: %d -> %d parameters%s", i + 1, n, name, report.params_before,
                 report.params_after, f" (oracle {report.oracle})" if report.oracle else
                 (f" (kept whole: {report.skipped})" if report.skipped else ""))
        if i == 0 and n > 1:
            _probe_config(sk, pruned)
        if i == n - 1:  # kept real for the config's proof
            last = (pruned, call)
            sk.set_layer(i, pruned)
        else:
            sk.set_layer(i, pruned.to("meta"))
        del layer, pruned, state
        gc.collect()
        if on_layer is not None:
            on_layer(i + 1, n, report)
    for key in sk.outside_layers():  # embeddings, final norm, head: as they are
        t = sk.checkpoint.get(key)
        writer.add(key, t)
        params_after += t.numel() if is_parameter(sk.model, key) else 0
    assert last is not None
    changes = _write_config(sk, last, stage)
    sk.set_layer(n - 1, last[0].to("meta"))
    files = [*writer.close(), "config.json", *_copy_other_files(sk.folder, stage)]
    unhonoured = _unhonoured(options, reports, changes)
    return StreamResult(stage, sk.params_before, params_after, tuple(reports), changes, tuple(files), 0.0,
                        tuple(unhonoured))


def _with_hidden(call: _Call, hidden: torch.Tensor) -> _Call:
    """The recorded call with its hidden-state input replaced (the first argument, or ``hidden_states=``)."""
    if call.args:
        return _Call((hidden, *call.args[1:]), dict(call.kwargs))
    return _Call((), {**call.kwargs, "hidden_states": hidden})


def _layer_output(layer: nn.Module, call: _Call, name: str) -> torch.Tensor:
    """What ``layer`` gives the next layer on ``call``: its hidden states, shaped like its input."""
    out = layer(*call.args, **call.kwargs)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):  # (hidden, ...) of older layers
        out = out[0]
    hidden = hidden_of(call)
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        raise FxPruneError(f"{name} returns {type(out).__name__}, not hidden states shaped like its input "
                           f"{tuple(hidden.shape)}: its layers cannot be streamed; use the in-memory path")
    return out


def _prune_layer(layer: nn.Module, name: str, call: _Call, calibration: list[_Call] | None, options: Options,
                 compile_part: Any, targets: list[_Call] | None = None) -> tuple[nn.Module, PartReport]:
    """One layer through the in-memory path's per-part compile; kept whole (with the reason) when it fails.
    ``targets``: the unpruned model's calls of the layer, batch for batch with ``calibration`` (the refit's)."""
    before = sum(p.numel() for p in layer.parameters())
    inside = _part_ignore(name, list(options.ignore))
    if inside is None:
        return layer, PartReport(name, before, before, skipped="ignored by the user")
    bound = _Bound(layer, call)
    own = None if calibration is None else fed_batches(name, bound, list(calibration))
    fed = None if calibration is None or targets is None else [
        bound.tensors(t) for c, t in zip(calibration, targets, strict=True) if bound.fits(c) and bound.fits(t)]
    # With a refit, the layer is traced on its first calibration batch: a graph specialised to the example's
    # shapes then runs every batch of those shapes, layers fitted in order (passes/reconstruct.py)
    example = own[0] if options.reconstruct and own else bound.tensors(call)
    outcome = compile_part(bound, example, inside, own, None, name,
                           targets=fed if fed and own is not None and len(fed) == len(own) else None)
    if not isinstance(outcome, Pruned):  # a layer is not split further when streaming: it is kept whole
        why = outcome.reason if outcome.error is None else first_line(outcome.error, typed=True)
        log.warning("fxprune: layer %s kept whole: %s", name, why)
        return layer, PartReport(name, before, before, skipped=why)
    result = outcome.result
    pruned = result.model.inner.eval()
    return pruned, PartReport(name, result.params_before, result.params_after, oracle_verdict(result.oracle))


def _probe_config(sk: Skeleton, first: nn.Module) -> None:
    """Fail after the first layer, not after the last, when the config cannot describe its pruned widths: every
    layer stood in for by a meta copy of the first (each layer keeps the same counts at one ratio)."""
    layers = list(sk.layers)
    try:
        for i in range(len(layers)):
            sk.set_layer(i, copy.deepcopy(first).to("meta"))
        _, why = propose(sk.model)
    finally:
        for i, layer in enumerate(layers):
            sk.set_layer(i, layer)
    if why:
        raise FxPruneError(f"the config cannot describe the pruned layer {sk.layers_name}.0 ({'; '.join(why)}), so "
                           "the folder would not load; keep those modules whole with ignore= (a module type, or "
                           "--ignore NAME per layer), or use the in-memory path and save with torch.save")


def _write_config(sk: Skeleton, last: tuple[nn.Module, _Call], stage: Path) -> dict[str, Any]:
    """The config rewritten to the pruned widths, proven three ways before it is written: a model built from it
    has the pruned shapes and module numbers (meta), and the last layer gives the same outputs under it."""
    changes, why = propose(sk.model)
    if why:
        raise FxPruneError(f"the config cannot describe the pruned model ({'; '.join(why)}), so the folder would not "
                           "load; use the in-memory path and save with torch.save")
    new = copy.deepcopy(sk.model.config)
    for k, v in changes.items():
        setattr(new, k, v)
    problem = _same_structure(sk.model, new) if changes else ""
    if not problem and changes:
        layer, call = last
        under_new = copy.deepcopy(layer)
        for m in under_new.modules():
            if hasattr(getattr(m, "config", None), "to_dict"):
                m.config = new
        with torch.no_grad():
            a, b = tensors_of(layer(*call.args, **call.kwargs)), tensors_of(under_new(*call.args, **call.kwargs))
        if len(a) != len(b) or not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
            problem = "the layers' forward reads the config and changes with it"
    if problem:
        raise FxPruneError(f"config changes {changes} cannot be written: {problem}; use the in-memory path")
    new.use_cache = sk.use_cache
    new.save_pretrained(stage)
    if changes:
        log.info("fxprune: config updated: %s", changes)
    return changes


def _copy_other_files(folder: Path, stage: Path) -> list[str]:
    """Tokenizer and generation files: every plain file of the folder that is not a weight file or the config."""
    copied = []
    for f in sorted(folder.iterdir()):
        weights = f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name.endswith(".index.json")
        if f.is_file() and not weights and f.name != "config.json" and not f.name.startswith("."):
            shutil.copy2(f, stage / f.name)
            copied.append(f.name)
    return copied


def _unhonoured(options: Options, reports: list[PartReport], changes: dict[str, Any]) -> list[str]:
    """Requests that did nothing, each also a warning."""
    said = []
    if options.ratio > 0 and not any(r.params_after < r.params_before for r in reports):
        said.append("nothing was pruned: " + ("; ".join(f"{r.name}: {r.skipped}" for r in reports if r.skipped)[:300]
                                              or "every group is pinned or too small"))
    if options.prune_heads and "num_attention_heads" not in changes:
        said.append(f"prune_heads={options.prune_heads!r} removed no attention head")
    for s in said:
        log.warning("fxprune: %s", s)
    return said
