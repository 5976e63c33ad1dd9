"""Check the traced graph against eager PyTorch once, before any analysis trusts it.

The mask oracle proves the pruned graph equal to the *traced* graph with channels zeroed; that proof is
worth nothing when the traced graph already differs from what the user's model computes in eager mode
(an in-place op on an aliased tensor that tracing did not see, a forward hook, Python state read during
tracing). This pass runs the private copy eagerly and the graph on one fresh input, with the same random
seed, and requires the same outputs. Both runs happen on fxprune's private copy, never on the caller's
tensors, and every parameter and buffer the runs changed is restored from the caller's model afterwards.

The check costs two forward passes. When the graph is shape-generic (traced without concrete shapes, so no
branch and no literal followed the example's size, and nothing lowered) and its inputs are images whose
sides are multiples of 32, it first runs at a quarter of the side (at least 64): what it looks for (an
in-place write the graph missed, a hook, Python state, randomness) does not depend on the size, and a
mismatch or failure at the small size only means the full-size check runs as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fxprune.errors import TraceError
from fxprune.outputs import tensors_of

log = logging.getLogger(__name__)

RTOL = 1e-4  # |graph - eager| <= RTOL * max|eager| + ATOL per output: float32 reassociation, not a channel
ATOL = 1e-5


def fresh_inputs(example_inputs: tuple[Any, ...], seed: int = 1234) -> tuple[Any, ...]:
    """Inputs of the same shapes and dtypes as ``example_inputs``, with other values.

    Floating tensors are redrawn from a normal with the example's mean and spread; integer and boolean
    tensors (token ids, masks) are a seeded permutation of the example's own values, so ids stay in range.
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.numel() and x.device.type == "cpu":
            if x.is_floating_point():
                flat = x.detach().double()
                std = float(flat.std()) if x.numel() > 1 else 1.0
                noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
                out.append((noise * (std if std > 0 else 1.0) + float(flat.mean())).to(x.dtype))
            else:
                perm = torch.randperm(x.numel(), generator=gen)
                out.append(x.detach().reshape(-1)[perm].reshape(x.shape).clone())
        else:
            out.append(x)
    return tuple(out)


def smaller_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """``inputs`` with every spatial side quartered (to a multiple of 32, at least 64); None when not images.

    Only when every tensor input is a floating NCHW/NCDHW tensor whose spatial sides are multiples of 32, one
    of them above 64 (sides a strided backbone with skip connections accepts at any scale; 64 leaves AlexNet's
    strided stem and three pools something to pool).
    """
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(not t.is_floating_point() or t.dim() not in (4, 5) for t in tensors):
        return None
    if any(d % 32 for t in tensors for d in t.shape[2:]) or all(d <= 64 for t in tensors for d in t.shape[2:]):
        return None
    out: list[Any] = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            crop = tuple(slice(0, min(d, max(64, d // 4 // 32 * 32))) for d in x.shape[2:])
            x = x[(slice(None), slice(None), *crop)].clone()  # a corner of the example: its value range
        out.append(x)
    return tuple(out)


def _watched(fn: Any, work: nn.Module, original: nn.Module, inputs: tuple[Any, ...], seed: int,
             kinds: list[Any] | None = None) -> tuple[list[torch.Tensor], set[str] | None]:
    """``_run`` under a ``_WriteWatch`` of ``work``: (outputs, the tensors it wrote). A run the watch cannot
    follow (an op Python dispatch does not support) runs again unwatched, after a full restore: (outputs,
    None), and None means the next restore compares every tensor."""
    watch = _WriteWatch(work)
    try:
        with watch:
            out = _run(fn, inputs, seed, kinds)
    except Exception:  # noqa: BLE001 - not only the model: dispatch may refuse an op; the plain run decides
        restore_state(work, original)
        if kinds:
            kinds.clear()
        return _run(fn, inputs, seed, kinds), None
    return out, watch.changed()


def _run(fn: Any, inputs: tuple[Any, ...], seed: int, kinds: list[Any] | None = None) -> list[torch.Tensor]:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = fn(*inputs)
        if kinds is not None:
            kinds.append((type(out), structure(out)))
        return [t.detach().clone() for t in tensors_of(out)]


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by qualified name, tied ones under each of their names."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def restore_state(work: nn.Module, original: nn.Module, only: set[str] | None = None,
                  skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Copy back every parameter and buffer of ``work`` whose value a run changed (read from ``original``).

    ``work`` is fxprune's private deep copy of ``original``; a forward may update buffers (running
    statistics, call counters) or even parameters (``Embedding(max_norm=...)`` renormalises its weight).
    ``only``: the names a ``_WriteWatch`` saw written (the others are not compared); ``skip``: names fxprune
    changed on purpose (a refit's weights and biases), never copied back.
    """
    mine, theirs = named_tensors(work), named_tensors(original)
    with torch.no_grad():
        for name, t in mine.items():
            src = theirs.get(name)
            if (only is not None and name not in only) or name in skip:
                continue
            if src is None or src.shape != t.shape or src.dtype != t.dtype or src.is_meta or t.is_meta:
                continue
            if not torch.equal(t, src):
                t.copy_(src)


class _WriteWatch(TorchDispatchMode):
    """Records which of a module's parameters and buffers a run writes: every aten op that writes its argument
    (in-place ops, ``out=``, ``.data.clamp_()`` included: they all reach aten) is matched by storage, and a
    tensor attribute replaced by another tensor is found by identity afterwards. Restoring then compares
    those tensors only, not the whole model twice per check."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.tensors = named_tensors(module)
        self.storages: dict[int, list[str]] = {}
        for name, t in self.tensors.items():
            if not t.is_meta:
                self.storages.setdefault(t.untyped_storage().data_ptr(), []).append(name)
        self.written: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for i, arg in enumerate(func._schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor) \
                        and not value.is_meta:
                    self.written.update(self.storages.get(value.untyped_storage().data_ptr(), ()))
        return func(*args, **kwargs)

    def changed(self) -> set[str]:
        """Names written by an op, or whose tensor was replaced (``self.count = self.count + 1``)."""
        now = named_tensors(self.module)
        return self.written | {n for n, t in now.items() if self.tensors.get(n) is not t}


def check_graph_matches_eager(gm: fx.GraphModule, work: nn.Module, original: nn.Module,
                              example_inputs: tuple[Any, ...], shape_generic: bool = False) -> type | None:
    """Require the traced graph to compute what the eager model computes, on one fresh input.

    Args:
        gm: the traced (unpruned) graph of ``work``; it shares ``work``'s submodules.
        work: fxprune's private copy of the user's model, in eval mode.
        original: the caller's model: only read, to restore ``work``'s tensors afterwards.
        example_inputs: the example inputs (the fresh input has their shapes and dtypes).
        shape_generic: the graph was traced without concrete shapes and nothing in it was lowered, so an
            image input may first be checked at a smaller size (see the module docstring).

    Returns:
        The class of the eager model's output (None when the model does not run on a fresh input).

    Raises:
        TraceError: the graph's outputs differ from eager PyTorch (names the output and the difference).
    """
    small = smaller_inputs(example_inputs) if shape_generic else None
    if small is not None:
        try:
            kind, problem = _compare(gm, work, original, fresh_inputs(small))
        except Exception as e:  # noqa: BLE001 - the model or its graph does not run at the smaller size
            kind, problem = None, f"it does not run there ({type(e).__name__})"
        if not problem:
            return kind
        log.debug("fxprune: eager check at the smaller size: %s; checking at full size", problem)
    try:
        kind, problem = _compare(gm, work, original, fresh_inputs(example_inputs))
    except _EagerFailed as e:  # the model does not accept other values of its inputs
        log.info("fxprune: eager check skipped, the model does not run on a fresh input (%s)", e.__cause__)
        return None
    if problem and problem != _NOTHING:
        raise TraceError(
            f"the traced graph of {type(original).__name__} differs from eager PyTorch on a fresh input ({problem}); "
            "tracing missed something the forward does (an in-place op on an aliased tensor, a forward hook, "
            "Python state or randomness read while tracing). fxprune will not prune a graph that is not your "
            "model: keep the part that does it opaque with leaves=[...], or rewrite it functionally"
        )
    return kind


_NOTHING = "no finite output to compare"  # proves nothing: at the smaller size, go to full size


class _EagerFailed(Exception):
    """The eager model raised on the check's input (its ``__cause__``)."""


def _compare(gm: fx.GraphModule, work: nn.Module, original: nn.Module, inputs: tuple[Any, ...]) -> tuple[type, str]:
    """Run ``work`` eagerly and ``gm`` on ``inputs`` with one random seed: (output class, difference or "").

    Every tensor of ``work`` a run changed is restored from ``original`` after each run, even on failure.

    Raises:
        _EagerFailed: the eager model raised. An exception of the graph's run propagates as it is.
    """
    kinds: list[Any] = []  # (output class, structure)
    seed = 4321  # the same random stream in both runs: a forward that draws noise draws the same noise
    try:
        try:
            eager, written = _watched(work, work, original, inputs, seed, kinds)
        except Exception as e:  # noqa: BLE001 - reported to the caller, which decides
            raise _EagerFailed(str(e)) from e
        eager_state = _state_left(work, original, written)
        restore_state(work, original, written)
        graph_kinds: list[Any] = []
        graph, written = _watched(fx.Interpreter(gm).run, work, original, inputs, seed, graph_kinds)  # no codegen
        graph_state = _state_left(work, original, written)
    except BaseException:
        restore_state(work, original)  # a failed run: whatever it wrote, compared in full
        raise
    restore_state(work, original, written)
    problem = (_state_difference(graph_state, eager_state)  # a lost update explains the outputs that follow
               or (structure_difference(graph_kinds[0][1], kinds[0][1]) if graph_kinds else "")
               or _difference(graph, eager))
    return kinds[0][0], problem or ("" if _finite(eager) else _NOTHING)


def structure(out: Any) -> Any:
    """The shape of an output as nested plain values: "tensor" for a tensor, dicts by key (a Hugging Face
    ``ModelOutput`` holds its non-None fields), lists for tuples and lists, and the type name of anything
    else (a cache object, None, a number). Two outputs a caller can use the same way have equal structures."""
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, dict):  # a None field is an absent one (a ModelOutput drops it; fx's dict keeps it)
        return {k: structure(v) for k, v in out.items() if v is not None}
    if isinstance(out, (list, tuple)):
        return [structure(v) for v in out]
    return type(out).__name__


def structure_difference(graph: Any, eager: Any, where: str = "output") -> str:
    """The first place where the graph's output structure differs from the eager model's ("" when none)."""
    if isinstance(eager, dict) and isinstance(graph, dict):
        for k in eager:
            if k not in graph:
                return f"{where} field {k!r} ({_kind(eager[k])}) is missing from the graph's output"
        for k in graph:
            if k not in eager:
                return f"{where} field {k!r} is in the graph's output, not in the model's"
        return next((d for k in eager if (d := structure_difference(graph[k], eager[k], f"{where}.{k}"))), "")
    if isinstance(eager, list) and isinstance(graph, list):
        if len(eager) != len(graph):
            return f"{where} has {len(graph)} items in the graph, {len(eager)} in the model"
        return next((d for i, (g, e) in enumerate(zip(graph, eager, strict=True))
                     if (d := structure_difference(g, e, f"{where}[{i}]"))), "")
    if graph != eager:
        return f"{where} is {_kind(graph)} in the graph, {_kind(eager)} in the model"
    return ""


def _kind(s: Any) -> str:
    return "a dict" if isinstance(s, dict) else "a sequence" if isinstance(s, list) else str(s)


def _state_left(work: nn.Module, original: nn.Module, written: set[str] | None) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``work`` a run left different from ``original``, by name (a copy).

    The state a forward updates (a running average, a call counter) is an output too: a graph that drops
    the update computes the same output on the first call and a different one on the next."""
    mine, theirs = named_tensors(work), named_tensors(original)
    out: dict[str, torch.Tensor] = {}
    for name, t in mine.items():
        src = theirs.get(name)
        if (written is not None and name not in written) or src is None or t.is_meta or src.is_meta:
            continue
        if src.shape != t.shape or src.dtype != t.dtype or not torch.equal(t, src):
            out[name] = t.detach().clone()
    return out


def _state_difference(graph: dict[str, torch.Tensor], eager: dict[str, torch.Tensor]) -> str:
    """How the state left by the graph's run differs from the eager run's ("" when the same)."""
    for name in sorted(eager.keys() - graph.keys()):
        return f"the forward updates {name!r} and the graph does not (state it writes, lost by tracing)"
    for name in sorted(graph.keys() - eager.keys()):
        return f"the graph updates {name!r} and the eager forward does not"
    names = sorted(eager)
    problem = _difference([graph[n] for n in names], [eager[n] for n in names])
    return f"the state a call leaves differs: {problem.replace('output ', 'tensor ')}" if problem else ""


def _finite(outputs: list[torch.Tensor]) -> bool:
    """Whether a comparison of ``outputs`` can show anything: an integer output, or a finite float value."""
    return any(not t.is_floating_point() or bool(torch.isfinite(t).any()) for t in outputs)


def _difference(graph: list[torch.Tensor], eager: list[torch.Tensor]) -> str:
    if len(graph) != len(eager):
        return f"the graph returns {len(graph)} tensors, the model {len(eager)}"
    for i, (a, b) in enumerate(zip(graph, eager, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)} in the graph, {tuple(b.shape)} in the model"
        if a.dtype != b.dtype:
            return f"output {i} has dtype {a.dtype} in the graph, {b.dtype} in the model"
        if not a.is_floating_point() and not a.is_complex():
            if not torch.equal(a, b):
                return f"output {i} (integer) differs"
            continue
        if not a.numel():
            continue
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return f"output {i} has non-finite values in other places"
        diff = float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0
        peak = float(b[finite].abs().max()) if finite.any() else 0.0
        if diff > RTOL * peak + ATOL:
            return f"output {i}: max |graph - eager| = {diff:.3g} (max |eager| = {peak:.3g})"
    return ""
