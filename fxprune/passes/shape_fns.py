"""Shape functions for the ops whose meta kernels are slow, used by the meta shape run (``shapes.py``): the
lookup of a node's function; the functions are in ``rules/shape_formulas.py``, each its ops' registry entry.

Meta kernels of broadcasting arithmetic, reductions and ``addmm`` are Python decompositions: 150-500 us a
call, against 20 us to compute the same result shape directly (a conv module on meta: 60-90 us). A shape
function here returns the meta tensor the kernel would return (shape, dtype and a contiguous layout), or
None whenever it is not certain to: inputs that are not contiguous (the kernel would propagate their
layout, and a later ``view`` depends on it), keyword arguments it does not model, dtypes the real op would
reject. None means: run the kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from fxprune.rules.registry import function_spec, method_spec, module_spec
from fxprune.rules.shape_formulas import ShapeFn, dense


def fast_meta(op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any = None) -> torch.Tensor | None:
    """The meta result of one node computed by a shape function, or None (run the kernel).

    Args:
        op: the node's op (``call_function``, ``call_method`` or ``call_module``).
        target: its target (a function, a method name, or a module path).
        args: the evaluated arguments (meta tensors and Python values).
        kwargs: the evaluated keyword arguments.
        mod: for ``call_module``, the module (with its meta parameters).
    """
    fn: ShapeFn | None = None
    if op == "call_function":
        fn = function_spec(target).shape
    elif op == "call_method":
        fn = method_spec(target).shape
    if fn is not None:
        return fn(args, kwargs)
    if op == "call_module":
        module_fn = module_spec(mod).shape
        if module_fn is None or kwargs or len(args) != 1 or not dense(args[0]):
            return None
        return module_fn(mod, args[0])
    return None
