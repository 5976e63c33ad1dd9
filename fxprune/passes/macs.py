"""Predict MACs and parameter counts of a plan from shapes alone, without building the pruned model.

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts, with torch's own shape formulas
(``conv_flop_count``, ``mm_flop``, ``bmm_flop``, ``sdpa_flop_count``): convolutions (modules and
``F.conv*``), linear layers (``nn.Linear``, ``F.linear``, ``addmm`` as in Hugging Face's Conv1D), ``mm``,
``bmm``, ``baddbmm``, ``matmul``, two-operand ``einsum`` and scaled dot-product attention. MACs are half of
torch's flops. Each formula is the ``macs`` field of its ops' registry entries (``rules/mac_formulas.py``).
A budget search probes many plans with it cheaply; ``tests/test_macs.py`` checks parity with
``FlopCounterMode`` on real models and on functional graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx
import torch.nn as nn

from fxprune.depgraph import param_value
from fxprune.passes.base import submodule
from fxprune.rules.registry import MacFn, MacQuery, call_spec, module_spec

if TYPE_CHECKING:
    from fxprune.passes.dependency import DependencyResult

Shape = tuple[int, ...]


def estimate_macs(gm: fx.GraphModule, deps: DependencyResult, shapes: dict[str, Shape], canonical: dict[int, str]) -> int:
    """MACs of the graph when every value has the shape given in ``shapes`` (original or planned).

    Args:
        gm: the traced (unpruned) model.
        deps: its dependency analysis.
        shapes: value name -> shape; parameters as ``param:<name>``.
        canonical: ``id(tensor)`` -> canonical parameter name (``passes.dependency.canonical_names``).
    """

    def param_shape(mod: nn.Module, name: str) -> Shape | None:
        p = getattr(mod, name, None)
        if p is None:
            return None
        return shapes.get(param_value(canonical.get(id(p), ""))) or tuple(p.shape)

    total = 0
    for node in gm.graph.nodes:
        out = shapes.get(node.name)
        if out is None:
            continue
        mod = submodule(gm, str(node.target)) if node.op == "call_module" else None
        fn: MacFn | None = module_spec(mod).macs if mod is not None else call_spec(node).macs
        if fn is not None:
            total += fn(MacQuery(node, out, shapes, mod, param_shape))
    return int(total)
