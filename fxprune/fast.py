"""Speed shortcuts: every place where fxprune stands in for a piece of torch to go faster, behind one switch.

Each shortcut gives exactly what the torch code it replaces gives, only faster; the switch turns them all
off, so that a doubt about a result can be settled by running plain torch code::

    FXPRUNE_FAST=0 python my_script.py          # or, in code:
    with fxprune.fast.disabled(): ...

``.ci/run`` runs the core tests (oracle over models_zoo, rules, fuzz regressions) with the switch both on
and off. The shortcuts, and what each stands in for (measured gains in docs/benchmarks.md):

- ``record_torch_function``: fx asks ``torch.overrides`` whether a torch function is a tensor method;
  that table of every overridable function costs 9-12 ms on first use. Used by the tracer's Proxy.
- ``TensorNames``: fx finds the name of a tensor read in a forward by scanning every parameter and buffer
  of the root, for every read (quadratic: 0.1 s of a 0.3 s timm compile). Used by the tracer's
  ``getattr`` and ``create_arg``.
- ``copy_module``: ``copy.deepcopy`` of a plain ``nn.Module`` tree (about 5x faster on a ResNet-50).
- ``deferred_graph_module``: torch's lazy GraphModule, whose Python code is generated on first use, not
  after every pass (~30 ms a recompile on a 700-node graph).
- ``meta_copy``: ``count_macs`` runs a copy whose tensors are on the meta device instead of a full deep copy
  (no second copy of a 1B-parameter model's memory, no arithmetic); a forward that needs values falls back.
- ``training_reads``: the train-mode trace (``passes/train_mode.py``) is skipped when the eval trace read no
  module's ``training`` flag and nothing was lowered: the two traces could not differ (15-30 ms a small net).
- Shape functions of the meta shape run (``meta_shape``, the ``shape`` field of registry entries, and
  shape-keeping modules passing their input through): slow Python meta kernels (150-500 us a call).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from fxprune.passes.shape_fns import fast_meta

try:  # torch's deferred-codegen GraphModule (used by Dynamo and Inductor for the same reason)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - older or newer torch without it: generate code eagerly
    _LazyGraphModule = None

ENABLED: bool = os.environ.get("FXPRUNE_FAST", "1") != "0"
"""The switch: True unless the environment sets ``FXPRUNE_FAST=0``."""


def set_enabled(on: bool) -> None:
    """Turn every speed shortcut on or off for this process."""
    global ENABLED
    ENABLED = bool(on)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block with every speed shortcut off (plain torch code), then restore the switch."""
    before = ENABLED
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


# ---- tracing -------------------------------------------------------------------------------------------

@functools.cache
def tensor_attributes() -> frozenset[Any]:
    """Every attribute of ``torch.Tensor``, and the ``__get__`` of each non-callable one.

    ``torch.overrides.is_tensor_method_or_property`` answers from torch's table of every overridable function
    of every namespace, built on its first call (9-12 ms here, a tenth of a small model's compile). The Tensor
    entries of that table are taken from exactly these attributes, so a function outside this set is no
    tensor method (``tests/test_trace.py`` checks the inclusion).
    """
    found: set[Any] = set()
    for name in dir(torch.Tensor):
        value = getattr(torch.Tensor, name, None)
        try:
            found.add(value)
            if not callable(value) and hasattr(value, "__get__"):
                found.add(value.__get__)
        except TypeError:  # an unhashable class attribute: no function
            continue
    return frozenset(found)


def record_torch_function(orig_method: Any, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None) -> fx.Proxy | None:
    """A torch function that is no tensor method (``torch.flatten``, ``F.relu``) recorded as a ``call_function``
    without asking torch's table of overridable functions (see ``tensor_attributes``); None: fx's own way."""
    if not ENABLED:
        return None
    name = getattr(orig_method, "__name__", None)
    if (
        isinstance(name, str) and name != "__get__" and inspect.isroutine(orig_method)
        and not isinstance(orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator))
        and orig_method not in tensor_attributes()
    ):
        tracers = {a.tracer for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)}
        if len(tracers) == 1:
            tracer = tracers.pop()
            return tracer.create_proxy(
                "call_function", orig_method, args or (), kwargs or {}, name=tracer.graph._target_to_str(name)
            )
    return None

_Names = dict[int, tuple[str, torch.Tensor]]


class TensorNames:
    """First name of every parameter and of every buffer of a root module, by id (with the tensor, so a hit
    is checked by identity: an id freed and reused during tracing never matches)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.params: _Names = {}
        for n, p in root.named_parameters():
            self.params.setdefault(id(p), (n, p))
        self.buffers: _Names = {}
        for n, b in root.named_buffers():
            self.buffers.setdefault(id(b), (n, b))

    def name_of(self, t: torch.Tensor, buffers: bool = True) -> str | None:
        """The qualified name of the very tensor ``t`` (a parameter, or with ``buffers`` a buffer), or None."""
        for table in (self.params, self.buffers) if buffers else (self.params,):
            hit = table.get(id(t))
            if hit is not None and hit[1] is t:
                return hit[0]
        return None


# ---- copying -------------------------------------------------------------------------------------------

_IMMUTABLE = (int, float, bool, str, type(None), torch.dtype, torch.device)
# The hook and state tables every nn.Module creates for itself in __init__.
_HOOK_TABLES = frozenset(k for k in nn.Module().__dict__ if k not in ("_parameters", "_buffers", "_modules", "training"))


def _plain(mod: nn.Module) -> bool:
    cls = type(mod)
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and (cls.__setstate__ is nn.Module.__setstate__ or _fills_defaults(cls.__setstate__))
    )


def _fills_defaults(setstate: Any) -> bool:
    """torch.nn's own ``__setstate__`` overrides (conv, softmax, ...) only fill attributes that modules pickled
    by old torch versions lack; a live module has them all, so copying its ``__dict__`` is equivalent."""
    return getattr(setstate, "__module__", "").startswith("torch.nn.modules.")


def copy_module(mod: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(mod, memo)``, with a fast path for plain modules (about 5x faster on a ResNet-50).

    A module whose class customises copying or pickling goes through ``copy.deepcopy``; in a plain module,
    empty hook dictionaries are recreated, immutable attributes kept, and everything else deep-copied with
    the shared memo, so references between modules and to (possibly shared) parameters stay consistent.
    """
    if id(mod) in memo:
        return memo[id(mod)]
    if not ENABLED or not _plain(mod):
        return copy.deepcopy(mod, memo)
    new = object.__new__(type(mod))
    memo[id(mod)] = new
    state: dict[str, Any] = {}
    for key, value in mod.__dict__.items():
        if key == "_modules":
            state[key] = {k: None if m is None else copy_module(m, memo) for k, m in value.items()}
        elif isinstance(value, _IMMUTABLE) or (type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value)):
            state[key] = value
        elif key in ("_parameters", "_buffers") and type(value) is dict:
            state[key] = {k: _copy_tensor(t, memo) for k, t in value.items()}
        elif key in _HOOK_TABLES and type(value) in (dict, OrderedDict, set) and not value:
            state[key] = type(value)()  # nn.Module's own per-instance tables: never shared
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def _copy_tensor(t: torch.Tensor | None, memo: dict[int, Any]) -> torch.Tensor | None:
    """``copy.deepcopy(t, memo)`` for a module's own parameter or buffer, without the generic machinery."""
    if t is None:
        return None
    if id(t) in memo:
        return memo[id(t)]
    if type(t) is torch.Tensor and t.is_leaf and not t.requires_grad and not t.__dict__:
        new = t.clone(memory_format=torch.preserve_format)
        memo[id(t)] = new
        return new
    return copy.deepcopy(t, memo)


# ---- GraphModules --------------------------------------------------------------------------------------

def deferred_graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use, not at construction.

    The passes between tracing and the rewrite only interpret the graph (shape runs, rules), and each
    ``recompile`` of an unchanged graph is wasted work: code generation and ``compile`` take ~30 ms on a
    700-node graph. Calling the module, reading ``.code``, printing, copying or pickling it still generate
    the code first, so nothing can observe a stale forward. ``generated`` turns it into a plain GraphModule.
    """
    if _LazyGraphModule is None or not ENABLED:
        return fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def generated(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as a plain ``fx.GraphModule`` with its code generated now (the form a user receives).

    A deferred module is switched in place to its own singleton GraphModule class, the form
    ``fx.GraphModule.__new__`` gives every instance; its state (submodules, parameters, meta) is untouched.
    """
    if _LazyGraphModule is not None and isinstance(gm, _LazyGraphModule):
        gm.__class__ = type("GraphModuleImpl", (fx.GraphModule,), {"__module__": fx.GraphModule.__module__})
        gm.recompile()
    return gm


# ---- meta shape run ------------------------------------------------------------------------------------


def meta_shape(op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any = None) -> torch.Tensor | None:
    """The meta result of one node from its registry entry's shape function, or None (run the kernel)."""
    return fast_meta(op, target, args, kwargs, mod) if ENABLED else None


# ---- train mode ----------------------------------------------------------------------------------------

class _TrainingReads(threading.local):
    depth: int = 0  # nested watches in this thread
    seen: bool = False


_READS = _TrainingReads()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0


def _get_training(self: nn.Module) -> bool:
    try:
        value = self.__dict__["training"]
    except KeyError:
        raise AttributeError("training") from None  # as without the property: Module.__getattr__ decides
    if _READS.depth:
        _READS.seen = True
    return value


def _set_training(self: nn.Module, value: bool) -> None:
    self.__dict__["training"] = value


def _shadowed(classes: set[type]) -> bool:
    return any("training" in vars(c) for k in classes for c in k.__mro__ if c is not nn.Module and c is not object)


@contextlib.contextmanager
def training_reads(model: nn.Module) -> Iterator[list[bool]]:
    """Watch the block for reads of any module's ``training`` flag: yields ``[read]``, set when it ends.

    Stands in for tracing the model a second time in train mode (``passes/train_mode.py``): the two traces
    can differ only where the traced Python code reads a module's mode (``self.training``, ``getattr``,
    ``F.dropout(x, p, self.training)``); the modes differ in nothing else, and leaf modules are not run by a
    symbolic trace. While the block runs, ``nn.Module.training`` is a property that notes every read in this
    thread (other threads read their flags as before). A model whose classes define ``training`` themselves
    would shadow the property, and the switch being off, both answer "read".
    """
    result = [True]
    if not ENABLED or _shadowed({type(m) for m in model.modules()}):
        yield result
        return
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            nn.Module.training = property(_get_training, _set_training)  # type: ignore[assignment]
        _PATCH_USERS += 1
    outer_seen = _READS.seen
    _READS.depth += 1
    _READS.seen = False
    try:
        yield result
    finally:
        result[0] = _READS.seen
        _READS.depth -= 1
        _READS.seen = outer_seen or _READS.seen
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                del nn.Module.training


# ---- counting ------------------------------------------------------------------------------------------

def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors of the same shapes (no data).

    Stands in for ``copy.deepcopy`` where only shapes matter (``metrics.count_macs``: torch's flop formulas
    read shapes alone). Ties stay ties; tensors held as plain attributes are copied as they are.
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        m = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)
