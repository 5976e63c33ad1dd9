"""Capture a model as an FX graph, turning untraceable submodules into opaque leaves automatically."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch.fx as fx
import torch.nn as nn

from fxprune.errors import TraceError

log = logging.getLogger(__name__)


class _FallbackTracer(fx.Tracer):
    """A tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(self, extra_leaves: set[str]) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.extra_leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def trace(model: nn.Module, leaves: Iterable[str] = ()) -> tuple[fx.GraphModule, dict[str, str]]:
    """Symbolically trace ``model``; a submodule whose forward cannot be traced becomes a leaf and is retried.

    Args:
        model: the module to trace (it is not modified; the GraphModule shares its submodules).
        leaves: qualified names of submodules to keep opaque from the start.

    Returns:
        The GraphModule and, per submodule made opaque, the reason (the tracing error it raised).

    Raises:
        TraceError: the root module's own forward cannot be traced.
    """
    opaque: dict[str, str] = {name: "kept opaque by request" for name in leaves}
    for _ in range(len(list(model.modules())) + 1):
        tracer = _FallbackTracer(set(opaque))
        try:
            graph = tracer.trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure triggers the leaf fallback
            culprit = tracer.stack[-1] if tracer.stack else ""
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
        name = type(model).__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        return gm, opaque
    raise TraceError("leaf fallback did not converge")  # unreachable: each retry adds a leaf
