"""Example values during tracing: every traced value computed on the example inputs as it is traced.

Plain ``symbolic_trace`` cannot iterate ``x.shape[:-1]`` (``view(*input_shape, -1, head_dim)`` in Hugging Face
attention) or branch on ``q.shape[2] > 1``: a Proxy has no length and no truth value. When the example inputs
are known and plain tracing failed, the tracer evaluates every new node on them, so the rank of a shape is
known (iteration yields ``shape[0], shape[1], ...`` as graph nodes: nothing is specialised) and, where the
caller allows it, a branch on shapes takes the side the example inputs take.

Functions are evaluated only when they are PyTorch's own (torch functions and tensor methods, ``operator``,
``math`` and builtins); modules run with tracing switched off around them (the same forward the shape pass
runs). Tensors read by the traced code are cloned first, so an in-place op never reaches a caller's weight.
Any failure leaves the value unknown, and tracing behaves as before.
"""

from __future__ import annotations

import builtins
import contextlib
import math
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr

from fxprune.rules.registry import has_trait

UNKNOWN = object()
# Methods that turn tensor data into Python values (trait "to_python"): a branch on them depends on the data,
# not on shapes, so their values are never recorded (a branch on them can then never follow the example inputs).
_KEY = "fxprune_example_value"
_SAFE_MODULES = (torch, operator, builtins, math)


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Module calls and attribute reads behave as outside tracing (fx patches both while it traces)."""
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _orig_module_call, _orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, getattr_  # type: ignore[method-assign]


def _is_torch_code(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    if module.startswith(("torch", "_operator", "operator", "math", "builtins")):
        return True
    return any(getattr(m, getattr(fn, "__name__", ""), None) is fn for m in _SAFE_MODULES)


def example_value(node: fx.Node) -> Any:
    """The example value recorded for ``node``, or ``UNKNOWN``."""
    return node.meta.get(_KEY, UNKNOWN)


def forget(graph: fx.Graph) -> None:
    """Drop the recorded example values (a tracing aid, not part of the result)."""
    for node in graph.nodes:
        node.meta.pop(_KEY, None)


class ExampleEvaluator:
    """Evaluates traced nodes on the example inputs, in the order the tracer creates them.

    Args:
        root: the module being traced (a private copy).
        inputs: the example inputs, one per placeholder in order.
    """

    def __init__(self, root: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.root = root
        self.inputs = list(inputs)
        self.placeholders = 0

    def record(self, node: fx.Node) -> None:
        """Compute and store the example value of a node just created (nothing on failure)."""
        # Only module calls and attribute reads need fx's patches undone (fx's getattr turns a parameter into a
        # Proxy). Undoing them for every node would cost more than the evaluation: assigning a method of
        # nn.Module invalidates the type cache of every subclass loaded (0.5 ms a node with transformers).
        patched = node.op in ("call_module", "get_attr")
        untraced = _untraced() if patched else contextlib.nullcontext()
        try:
            with torch.no_grad(), untraced:
                value = self._evaluate(node)
        except Exception:  # noqa: BLE001 - an op that fails here: the value stays unknown
            value = UNKNOWN
        if value is not UNKNOWN and not isinstance(value, fx.Proxy):
            node.meta[_KEY] = value

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            i = self.placeholders
            self.placeholders += 1
            return self.inputs[i] if i < len(self.inputs) else UNKNOWN
        if node.op == "get_attr":
            value: Any = self.root
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if isinstance(value, nn.Module):
                return UNKNOWN
            return value.detach().clone() if isinstance(value, torch.Tensor) else value
        args, kwargs = self._inputs_of(node)
        if args is UNKNOWN:
            return UNKNOWN
        if node.op == "call_function":
            return node.target(*args, **kwargs) if _is_torch_code(node.target) else UNKNOWN  # type: ignore[operator]
        if node.op == "call_method":
            if not isinstance(args[0], (torch.Tensor, torch.Size)) or has_trait(node, "to_python"):
                return UNKNOWN
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        return UNKNOWN

    @staticmethod
    def _inputs_of(node: fx.Node) -> tuple[Any, Any]:
        missing = []

        def value(n: fx.Node) -> Any:
            v = example_value(n)
            if v is UNKNOWN:
                missing.append(n)
            return v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        return (UNKNOWN, UNKNOWN) if missing else (args, kwargs)
