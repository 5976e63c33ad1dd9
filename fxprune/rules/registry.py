"""The op registry: everything fxprune knows about one module type, function or tensor method, in one entry.

An ``OpSpec`` holds up to five things, each optional:

- ``rule(node, ctx)``: the channel couplings the op states (``rules/context.py``). Without one, the op pins
  every dim it touches.
- ``literals(node, old_shapes, new_shapes)``: rewrites sizes written in the node's arguments after channels
  were removed (a ``view`` shape, ``split`` sizes).
- ``shape``: a fast shape function for the meta shape run (a speed shortcut, ``fxprune/fast.py``); for
  functions and methods ``shape(args, kwargs)``, for modules ``shape(module, x)``; returns a meta tensor or
  None (run the kernel).
- ``macs(query)``: multiply-accumulates from shapes alone (``MacQuery``), with torch's own flop formulas.
- ``fixup(module, new_in)``: updates a module's size attributes after its parameters were sliced.
- ``traits``: names of what the op is, for the passes that ask about a kind of op rather than one op
  (``has_trait``); registering traits adds to those already there. The built-in ones and who reads them:

  ====================== ==============================================================================
  ``attention_product``  batch dims are attention heads (``passes/dependency.py``: head reshapes)
  ``head_layout``        may sit between a head reshape and an attention product (``passes/dependency.py``)
  ``rotary``             elementwise ops a rotary embedding puts there too (``prune_heads="query"``)
  ``contraction``        multiplies its operands (``passes/shapes.py``: mixed dtypes run for real)
  ``batch_norm``         ``F.batch_norm``-like: per-channel statistics (``passes/shapes.py``)
  ``layer_norm``         ``F.layer_norm``-like: normalised trailing shape (``passes/shapes.py``)
  ``in_place``           writes into its first input (``passes/rewrite.py``)
  ``residual_add``       ``a + b`` that can close a residual branch (``passes/paired_runs.py``, ``depth_graph.py``)
  ``to_python``          turns tensor data into a Python value (``passes/example_values.py``: never recorded)
  ``elementwise``        the hidden-size probe lets the stream through, value by value (``hidden_streams.py``)
  ``stream_layout``      the probe follows the stream's last dim through it (``hidden_streams.py``)
  ``reduction``          the probe reads it as a statistic when it reduces the stream (``hidden_streams.py``)
  ``norm``               the probe records a norm over the stream (``hidden_streams.py``)
  ====================== ==============================================================================

  The hidden-size probe sees ops as they run (``TorchFunctionMode``), by function or by name: it reads the
  traits of the function and of the tensor method of the same name.

Keys: a module type (``nn.Conv2d``), a dotted class path for classes of optional packages matched without
importing them (``"transformers.pytorch_utils.Conv1D"``), a function object, or a method name (no dot).
The built-in entries are registered in one place, ``rules/builtin.py``; a user adds an op with one call::

    fxprune.rules.register(my_op, rule=my_rule)

A module type's ``rule``, ``shape`` and ``macs`` describe its ``forward``: a subclass inherits them only if it
does not override ``forward``. ``fixup`` is about attributes and is inherited by every subclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
import torch.nn as nn

if TYPE_CHECKING:
    from fxprune.rules.context import RuleContext

Shape = tuple[int, ...]
Rule = Callable[[fx.Node, "RuleContext"], None]
Rewriter = Callable[[fx.Node, list[Shape], list[Shape]], None]


@dataclass(frozen=True)
class MacQuery:
    """What a MAC function may ask about one node: its output shape and the shapes of its inputs.

    Attributes:
        node: the node.
        out: its output shape under the plan being costed.
        shapes: value name -> shape under that plan.
        module: for ``call_module`` nodes, the module.
        param_shape: ``param_shape(module, "weight")`` -> the parameter's shape under the plan.
    """

    node: fx.Node
    out: Shape
    shapes: dict[str, Shape]
    module: nn.Module | None = None
    param_shape: Callable[[nn.Module, str], Shape | None] | None = None

    def arg(self, i: int, name: str = "") -> Shape | None:
        """Shape of positional argument ``i`` (or keyword ``name``), None if it is not a traced value."""
        a = self.node.args[i] if len(self.node.args) > i else self.node.kwargs.get(name)
        return self.shapes.get(a.name) if isinstance(a, fx.Node) else None


MacFn = Callable[[MacQuery], int]
FixUp = Callable[[nn.Module, "int | None"], None]


@dataclass(frozen=True)
class OpSpec:
    """One op's entry. See the module docstring for what each field means."""

    rule: Rule | None = None
    literals: Rewriter | None = None
    shape: Callable[..., Any] | None = None
    macs: MacFn | None = None
    fixup: FixUp | None = None
    traits: frozenset[str] | None = None
    qualifies: Callable[[nn.Module], bool] | None = None
    """Only for dotted class paths: the entry applies to an instance only when this is true (a composite
    whose parts were checked); such a module is then traced as one leaf."""


_FORWARD_BOUND = ("rule", "shape", "macs")
_MODULES: dict[type | str, OpSpec] = {}
_FUNCTIONS: dict[Any, OpSpec] = {}
_METHODS: dict[str, OpSpec] = {}
_type_cache: dict[type, OpSpec] = {}
_EMPTY = OpSpec()
_builtins_loaded = False
_loaders: list[Callable[[], None]] = []  # rules/__init__.py adds builtin.install: this module imports no entry


def register(op: type | str | Callable[..., Any], spec: OpSpec | None = None, **fields: Any) -> OpSpec:
    """Register (or extend) the entry of ``op``; fields given replace those already registered.

    Args:
        op: a module type, a dotted class path, a function, or a tensor method name.
        spec: a whole entry; fields of ``spec`` that are None keep the registered ones.
        **fields: single fields (``rule=``, ``literals=``, ``shape=``, ``macs=``, ``fixup=``, ``traits=``,
            ``qualifies=``); ``traits`` (any iterable of names) are added to the registered ones.

    Returns:
        The entry now registered.
    """
    load_builtins()
    table, key = _table(op)
    new = {f.name: getattr(spec, f.name) for f in dataclasses.fields(OpSpec)} if spec is not None else {}
    new = {k: v for k, v in new.items() if v is not None} | fields
    unknown = set(new) - {f.name for f in dataclasses.fields(OpSpec)}
    if unknown:
        raise TypeError(f"register(): unknown OpSpec fields {sorted(unknown)}")
    old = table.get(key, _EMPTY)
    if "traits" in new:
        if isinstance(new["traits"], str):
            raise TypeError(f"register(): traits is a collection of names, got the string {new['traits']!r}")
        new["traits"] = frozenset(old.traits or ()) | frozenset(new["traits"])
    entry = dataclasses.replace(old, **new)
    table[key] = entry
    _type_cache.clear()
    return entry


def _table(op: object) -> tuple[dict[Any, OpSpec], Any]:
    if isinstance(op, type):
        if not issubclass(op, nn.Module):
            raise TypeError(f"register(): {op.__name__} is a type but not an nn.Module")
        return _MODULES, op
    if isinstance(op, str):
        return (_MODULES, op) if "." in op else (_METHODS, op)
    if callable(op):
        return _FUNCTIONS, op
    raise TypeError(f"register(): cannot key an op by {op!r}")


def load_builtins() -> None:
    """Register the built-in entries once. ``passes.trace.trace`` calls this before fx patches anything:
    while fx traces, the globals of wrapped functions are patched, and rule tables imported then would
    key the patched wrappers instead of the functions."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for load in _loaders:
            load()


def add_loader(load: Callable[[], None]) -> None:
    """Have ``load`` register entries before the first lookup (``rules/__init__.py`` adds the built-in ones)."""
    _loaders.append(load)


def fix_attributes(mod: nn.Module, new_in: int | None) -> None:
    """Run the registered attribute fix-up of ``mod`` (after its parameters were sliced), if it has one."""
    fix = module_spec(mod).fixup
    if fix is not None:
        fix(mod, new_in)


def class_path(cls: type) -> str:
    """The dotted path a class is registered under when its package is optional."""
    return f"{cls.__module__}.{cls.__qualname__}"


def composite(mod: nn.Module) -> OpSpec | None:
    """The entry of a known composite (a dotted-path entry with ``qualifies``) that ``mod`` qualifies for."""
    load_builtins()
    entry = _MODULES.get(class_path(type(mod)))
    if entry is None or entry.qualifies is None or entry.rule is None:
        return None
    return entry if entry.qualifies(mod) else None


def is_leaf(mod: nn.Module) -> bool:
    """Whether ``mod`` is traced as one node: its exact class has a registered rule, or it is a composite."""
    load_builtins()
    entry = _MODULES.get(type(mod))
    return (entry is not None and entry.rule is not None) or composite(mod) is not None


def module_spec(mod: nn.Module) -> OpSpec:
    """The entry for a module instance: the merged entries of its class's MRO, under its composite entry."""
    load_builtins()
    cls = type(mod)
    cached = _type_cache.get(cls)
    if cached is None:
        cached = _type_cache[cls] = _merged(cls)
    found = composite(mod)
    if found is None:
        return cached
    return dataclasses.replace(cached, **{f.name: getattr(found, f.name) for f in dataclasses.fields(OpSpec)
                                          if getattr(found, f.name) is not None})


def _merged(cls: type) -> OpSpec:
    fields: dict[str, Any] = {}
    for t in cls.__mro__:
        entry = _MODULES.get(t) or _MODULES.get(class_path(t))
        if entry is None or entry.qualifies is not None:
            continue
        same_forward = getattr(cls, "forward", None) is getattr(t, "forward", None)
        for f in dataclasses.fields(OpSpec):
            value = getattr(entry, f.name)
            if value is None or f.name in fields or (f.name in _FORWARD_BOUND and not same_forward):
                continue
            fields[f.name] = value
    return OpSpec(**fields)


def function_spec(fn: Any) -> OpSpec:
    """The entry of a function (an empty entry if it has none or cannot be hashed)."""
    load_builtins()
    try:
        return _FUNCTIONS.get(fn, _EMPTY)
    except TypeError:  # an unhashable callable object
        return _EMPTY


def method_spec(name: str) -> OpSpec:
    """The entry of a tensor method name."""
    load_builtins()
    return _METHODS.get(name, _EMPTY)


def has_trait(node: fx.Node, trait: str) -> bool:
    """Whether the function or tensor method ``node`` calls has ``trait`` (module docstring)."""
    return trait in (call_spec(node).traits or ())


def runtime_traits(func: Any) -> frozenset[str]:
    """The traits of a function seen while it runs (the hidden-size probe): its own, and those of the tensor
    method of its name (``torch.Tensor.add`` arrives as a method descriptor named ``add``)."""
    name = getattr(func, "__name__", None)
    return (function_spec(func).traits or frozenset()) | (
        (method_spec(name).traits or frozenset()) if isinstance(name, str) else frozenset())


def call_spec(node: fx.Node) -> OpSpec:
    """The entry of a ``call_function`` or ``call_method`` node (empty for other nodes)."""
    if node.op == "call_function":
        return function_spec(node.target)
    if node.op == "call_method":
        return method_spec(str(node.target))
    return _EMPTY
