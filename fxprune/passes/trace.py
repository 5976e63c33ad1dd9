"""Capture a model as an FX graph, turning untraceable submodules into opaque leaves automatically."""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from fxprune import fast
from fxprune.errors import TraceError
from fxprune.passes.example_values import ExampleEvaluator, example_value, forget
from fxprune.rules import registry

log = logging.getLogger(__name__)


class _SizedProxy(fx.Proxy):
    """A Proxy whose length is known (``chunk(n)``, ``split([sizes])``, a traced shape): see ``known_length``."""

    @classmethod
    def __torch_function__(
        cls, orig_method: Any, types: tuple[type, ...], args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> fx.Proxy:
        """fx's, or the ``fast.record_torch_function`` shortcut."""
        proxy = fast.record_torch_function(orig_method, args, kwargs)
        if proxy is not None:
            return proxy
        return super().__torch_function__(orig_method, types, args, kwargs)

    def __len__(self) -> int:
        n = self.tracer.known_length(self) if isinstance(self.tracer, _FallbackTracer) else None
        if n is None:
            return super().__len__()
        return n

    def __index__(self) -> int:
        """A traced size used as a Python index (slicing a buffer): its example value, when specialising."""
        tracer = self.tracer
        value = example_value(self.node)
        if isinstance(tracer, _FallbackTracer) and tracer.specialize and isinstance(value, int):
            return value
        raise TypeError(f"{self.node.name} is a traced value, not an __index__ (specialising is off)")


class _FallbackTracer(fx.Tracer):
    """A tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(
        self, extra_leaves: set[str] | None = None, values: ExampleEvaluator | None = None, specialize: bool = False
    ) -> None:
        super().__init__()  # no required arguments: torch.load re-creates the tracer class
        # Buffers read by the code become get_attr nodes, so ops on them alone (``self.ema.mul_(0.9)``, a
        # counter's ``add_(1)``, ``self.ema.view(...)``) are recorded, not run once at trace time as constants.
        self.proxy_buffer_attributes = True
        self.extra_leaves = extra_leaves or set()
        self.stack: list[str] = []
        self.values = values  # values of traced nodes (``example_values.py``), when the inputs are known
        self.specialize = specialize  # may a branch on shapes follow the example inputs?
        self._names: fast.TensorNames | None = None  # see _tensor_names
        self.function_calls: list[str] = []  # FunctionCall modules added to the root while tracing

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, *rest, **options)
        if self.values is not None and kind != "output":
            self.values.record(node)  # every node, also get_attr ones made for buffers read by the code
        return node

    def known_length(self, obj: fx.Proxy) -> int | None:
        """Length of ``chunk(n)``/``split([sizes])`` (a literal) or of a traced shape (its rank, fixed by the
        graph); when specialising, also of a list or tuple value or of a tensor's first dim (these follow the
        example inputs); else None."""
        n = _literal_length(obj.node)
        if n is not None:
            return n
        value = example_value(obj.node)
        if isinstance(value, torch.Size):
            return len(value)
        if self.specialize and isinstance(value, (tuple, list)):
            return len(value)
        if self.specialize and isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
        return None

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on shapes follows the example inputs, when specialising is allowed."""
        value = example_value(obj.node)
        if self.specialize and isinstance(value, (bool, int)):
            return bool(value)
        return super().to_bool(obj)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's ``Tracer.getattr``, with the tensor's name from ``fast.TensorNames`` (not by scanning every
        parameter and buffer of the root on every read) when the shortcuts are on."""
        if not fast.ENABLED:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        names = self._tensor_names()
        name = names.name_of(attr_val, buffers=False) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = names.name_of(attr_val)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            factory = None
            if self.param_shapes_constant:
                def factory(node: fx.Node, n: str = name) -> fx.Proxy:
                    return fx.proxy.ParameterProxy(self, node, n, attr_val)
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """fx's ``create_arg``, with a module's own parameters and buffers named from ``fast.TensorNames``
        (fx scans every buffer of the root for each tensor argument) when the shortcuts are on."""
        if fast.ENABLED and isinstance(a, torch.Tensor):
            name = self._tensor_names().name_of(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _tensor_names(self) -> fast.TensorNames:
        if self._names is None or self._names.root is not self.root:
            self._names = fast.TensorNames(self.root)
        return self._names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """fx's leaves (``torch.nn`` modules), the requested ones, and registered ones (``registry.is_leaf``)."""
        return (
            module_qualified_name in self.extra_leaves
            or isinstance(m, torch.jit.ScriptModule)  # a scripted submodule runs as it is (and is pinned)
            or super().is_leaf_module(m, module_qualified_name)
            or registry.is_leaf(m)
        )

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        """Iterate a value whose length is known (``known_length``): ``chunk(n)``, ``split([sizes])``, a shape.

        This is what makes ``list(x.chunk(2, 1))`` (Ultralytics C2f) and ``(*x.shape[:-1], -1, d)`` traceable.
        """
        n = self.known_length(obj)
        if n is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(n)])

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise
            # A stateless module that no submodule path reaches: a function wrapped as a module object
            # (transformers >= 5.25 turns ``apply_rotary_pos_emb`` into one when ``kernels`` is installed).
            # It holds no channels, so its code is traced inline, as the function it stands for.
            return forward(*args, **kwargs)
        self.stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out



# Augmented assignment on a Proxy: fx defines no ``__iadd__``, so Python falls back to ``a = a + b`` and the
# graph loses the write into ``a``'s tensor that every other name for it (``skip = a``) sees in eager PyTorch.
# Recorded as ``operator.iadd`` (codegen ``a += b``), the graph mutates the same tensor, as eager does.
_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul")


def _inplace_operator(name: str) -> Any:
    target = getattr(operator, name)

    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in _INPLACE_OPERATORS:
    setattr(_SizedProxy, f"__{_name}__", _inplace_operator(_name))


class FunctionCall(nn.Module):
    """One call of a custom ``torch.autograd.Function``, kept whole in the graph.

    Tracing through ``MyFunction.apply`` would record its forward's ops and lose its backward (a
    straight-through estimator's gradient becomes zero). The graph calls this module instead, which calls
    ``apply`` at run time, backward included. It has no channel rule, so what it touches is pinned.
    """

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.apply(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


_APPLY = torch.autograd.Function.__dict__["apply"]  # the classmethod every Function subclass inherits


@contextlib.contextmanager
def _functions_as_calls(tracer: _FallbackTracer) -> Iterator[None]:
    """While ``tracer`` traces, ``SomeFunction.apply`` on a Proxy becomes a ``call_module`` of a ``FunctionCall``."""

    def apply(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
        proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy) and a.tracer is tracer]
        if not proxies:
            return _APPLY.__func__(cls, *args, **kwargs)
        name = f"_fxprune_function_{len(tracer.function_calls)}"
        tracer.function_calls.append(name)
        tracer.root.add_module(name, FunctionCall(cls))
        return tracer.create_proxy("call_module", name, args, kwargs)

    torch.autograd.Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.autograd.Function.apply = _APPLY  # type: ignore[method-assign]


def _keep_state_dict_keys(model: nn.Module, gm: fx.GraphModule) -> None:
    """Carry over parameters/buffers the eval graph never reads (``num_batches_tracked`` of a traced-through
    BatchNorm), so the pruned model's state_dict keys are exactly the original's.

    Tensors the tracer baked into the graph (``_tensor_constant0``: an index computed from a non-persistent
    buffer) become non-persistent buffers: they are part of the graph, not of the user's checkpoint.
    """
    wanted = model.state_dict(keep_vars=True)
    for name, _ in list(gm.named_buffers(recurse=False)):
        if name.startswith("_tensor_constant") and name not in wanted:
            gm._non_persistent_buffers_set.add(name)
    have = set(gm.state_dict(keep_vars=True))
    for key, t in wanted.items():
        if key in have:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner: nn.Module = gm
        for part in owner_name.split(".") if owner_name else []:
            child = getattr(owner, part, None)
            if not isinstance(child, nn.Module):
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if attr in owner.__dict__:  # a plain attribute of that name (a forward assigned to its buffer)
            delattr(owner, attr)
        if isinstance(t, nn.Parameter):
            owner.register_parameter(attr, t)
        else:
            owner.register_buffer(attr, t)


def _drop_function_calls(model: nn.Module, tracer: _FallbackTracer) -> None:
    for name in tracer.function_calls:
        model._modules.pop(name, None)


def _literal_length(node: fx.Node) -> int | None:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name == "chunk":
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        return n if isinstance(n, int) else None
    if name == "split":
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
        return len(sizes) if isinstance(sizes, (list, tuple)) else None
    return None


def _fixed_arity(model: nn.Module, n_inputs: int) -> type | None:
    """A subclass whose forward takes exactly ``n_inputs`` tensors, when the real one has *args/**kwargs.

    FX turns ``*args`` into one Proxy, and a forward that passes it on (``self.predict(x, *args)``) cannot
    be traced; the subclass calls the original forward with the inputs only.
    """
    cls = type(model)
    params = inspect.signature(cls.forward).parameters.values()
    if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    names = ", ".join(f"input_{i}" for i in range(n_inputs))
    namespace: dict[str, Any] = {"_forward": cls.forward}
    exec(f"def forward(self, {names}):\n    return _forward(self, {names})\n", namespace)  # noqa: S102
    return type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__})


def _saved(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]:
    """Each module's attributes and buffers, to undo what tracing its forward assigned (see ``_restore``)."""
    return [(m, dict(m.__dict__), dict(m._buffers)) for m in model.modules()]


def _restore(saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]) -> None:
    """Undo attribute writes made while tracing (a forward that caches ``self.anchors = ...`` or updates
    ``self.seen = self.seen + x`` stores Proxies, in ``__dict__`` or in the module's buffers)."""
    for mod, state, buffers in saved:
        if mod.__dict__.keys() != state.keys() or any(mod.__dict__[k] is not v for k, v in state.items()):
            mod.__dict__.clear()
            mod.__dict__.update(state)
        if isinstance(mod, torch.jit.ScriptModule):
            continue  # its buffers live in the script object: its own forward never ran in Python
        for k in [k for k in mod._buffers if k not in buffers]:
            del mod._buffers[k]
        for k, v in buffers.items():
            if mod._buffers.get(k) is not v:
                mod._buffers[k] = v


def _needs_specialising(e: Exception) -> bool:
    """A tracing error that example values would resolve when branches may follow the inputs."""
    text = str(e)
    return isinstance(e, (fx.proxy.TraceError, TypeError, RuntimeError)) and (
        "control flow" in text or "cannot be iterated" in text or "__index__" in text or "'len' is not supported" in text
    )


def trace(
    model: nn.Module, leaves: Iterable[str] = (), n_inputs: int = 1,
    example_inputs: tuple[Any, ...] | None = None, specialize: bool = False,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Symbolically trace ``model``; a submodule whose forward cannot be traced becomes a leaf and is retried.

    When plain tracing fails and ``example_inputs`` are given, tracing is retried with example values
    (``example_values.py``): shapes can then be iterated, and with ``specialize`` a branch on shapes follows the
    example inputs (only for callers that re-check the user's own forward, such as ``output="module"``).

    Args:
        model: the module to trace (it is not modified; the GraphModule shares its submodules).
        leaves: qualified names of submodules to keep opaque from the start.
        n_inputs: the number of inputs (for a forward that takes ``*args``).
        example_inputs: the inputs, for the example values.
        specialize: let branches on shapes follow the example inputs.

    Returns:
        The GraphModule and, per submodule made opaque, the reason (the tracing error it raised).

    Raises:
        TraceError: the root module's own forward cannot be traced.
    """
    registry.load_builtins()  # before fx patches the globals of wrapped functions
    opaque: dict[str, str] = {name: "kept opaque by request" for name in leaves}
    original_cls = type(model)
    fixed = _fixed_arity(model, n_inputs)
    if fixed is not None:
        model.__class__ = fixed  # only ever the private copy; restored below
    try:
        return _trace_with_fallback(model, opaque, original_cls.__name__, example_inputs, specialize)
    finally:
        model.__class__ = original_cls


def _trace_with_fallback(
    model: nn.Module, opaque: dict[str, str], name: str, inputs: tuple[Any, ...] | None, specialize: bool
) -> tuple[fx.GraphModule, dict[str, str]]:
    with_values = False
    reads_training = False  # whether any attempt's Python code read a module's mode (fast.training_reads)
    for _ in range(len(list(model.modules())) + 2):
        values = ExampleEvaluator(model, inputs) if with_values and inputs is not None else None
        tracer = _FallbackTracer(set(opaque), values, specialize)
        saved = _saved(model)
        read = [True]  # until the watch below has run
        try:
            with _functions_as_calls(tracer), fast.training_reads(model) as read:
                graph = tracer.trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure triggers the leaf fallback
            reads_training = reads_training or read[0]
            _drop_function_calls(model, tracer)
            _restore(saved)
            if not with_values and inputs is not None:
                with_values = True  # first retry: the same modules, with every value known
                continue
            # The deepest module on the stack whose forward was being traced: a failure raised while a
            # leaf (a plain Linear) was being recorded comes from its caller's code.
            traced = [n for n in tracer.stack if not tracer.is_leaf_module(model.get_submodule(n), n)]
            culprit = traced[-1] if traced else ""
            if culprit and tracer.values is not None and not specialize and _needs_specialising(e):
                # Its branch on shapes could follow the example inputs once it is compiled on its own
                # (piecewise, as the user's module): keep its parent whole too, so that part also holds
                # the layers that consume its width (BERT's self-attention and its output projection). A
                # container parent (a Sequential holding the whole network) would swallow too much.
                parent = culprit.rpartition(".")[0]
                container = parent and isinstance(model.get_submodule(parent), (nn.Sequential, nn.ModuleList))
                culprit = parent if parent and parent not in opaque and not container else culprit
            if not culprit or culprit in opaque:
                raise TraceError(
                    f"cannot trace {type(model).__name__}.forward with torch.fx ({type(e).__name__}: {e}). "
                    "Move data-dependent control flow into a submodule (it will be kept opaque) "
                    "or pass a traceable model."
                ) from e
            reason = f"untraceable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            log.info("fxprune: tracing %s failed, keeping it opaque: %s", culprit, reason)
            opaque[culprit] = reason
            continue
        forget(graph)
        gm = fast.deferred_graph_module(tracer.root, graph, name)  # copies the constants the tracer put on the root
        # Shapes were concrete while tracing: branches may have followed them (read by the eager check).
        gm.meta["fxprune_example_values"] = tracer.values is not None
        # No attempt read a module's mode: a train-mode trace would give this graph (passes/train_mode.py).
        gm.meta["fxprune_reads_training"] = reads_training or read[0]
        _drop_function_calls(model, tracer)  # they live in the GraphModule only, not in the user's tree
        _restore(saved)
        _keep_state_dict_keys(model, gm)
        return gm, opaque
    raise TraceError("leaf fallback did not converge")  # unreachable: each retry adds a leaf
