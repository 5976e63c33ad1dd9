"""What the public entry points return: ``PruneResult`` (``prune``) and ``Analysis`` (``analyze``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from fxprune.partial import PartReport
from fxprune.passes.verify import OracleReport
from fxprune.plan import ChannelGroup, PruningPlan


@dataclass(frozen=True)
class Analysis:
    """A dry run: the coupled groups of a model and why some cannot be pruned. Nothing is modified.

    Attributes:
        groups: every coupled channel group.
        opaque: submodules kept opaque by the tracer, with the reason.
        example_inputs: the inputs used for shape propagation (given or synthesized).
        fingerprint: hash of the traced graph (what a saved plan is checked against).
    """

    groups: tuple[ChannelGroup, ...]
    opaque: dict[str, str]
    example_inputs: tuple[Any, ...]
    fingerprint: str
    dependencies: Any = field(default=None, repr=False, compare=False)

    @property
    def graph(self) -> Any:
        """The channel-dependency graph as a ``networkx.MultiGraph``, for drawing and inspection.

        Nodes are channel spaces ``(value, dim)``: one dim of one tensor or parameter (``"param:conv.weight"``),
        with ``size``, ``pinned`` (the reason, "" when free) and ``group`` (the id of the coupled group its
        channels belong to, -1 when none). Each edge is one coupling a rule stated, with ``why`` (the node)
        and ``a_index``/``b_index``: index ``a_index[k]`` of one end is channel ``b_index[k]`` of the other
        (None: the identity). ``examples/draw_dependency_graph.py`` draws it.
        """
        g = self.dependencies.couplings.graph
        sol = self.dependencies.solution
        for space in g.nodes:
            ids = sol.groups_in(space) if space in sol.offsets else []
            g.nodes[space]["group"] = ids[0] if ids else -1
        return g

    def table(self) -> str:
        """A readable table: one line per group."""
        lines = [f"{'group':>5}  {'channels':>8}  {'pinned':>6}  status  [first producer]"]
        for g in self.groups:
            what = g.producers[0] if g.producers else "-"
            status = "prunable" if g.prunable else f"kept: {g.reason}"
            lines.append(f"{g.id:>5}  {g.size:>8}  {g.n_pinned:>6}  {status}  [{what}]")
        n_ok = sum(g.prunable for g in self.groups)
        lines.append(f"{n_ok} of {len(self.groups)} groups prunable")
        return "\n".join(lines)


@dataclass(frozen=True)
class PruneResult:
    """Everything ``prune`` produced.

    Attributes:
        model: the pruned, dense model (a new object; the input model is untouched): a GraphModule, or
            with ``output="module"`` a copy of the user's own module tree proven equal to it.
        plan: the channels kept per group (save it with ``plan.save(path)``).
        modified: False when nothing was removed (ratio 0 or nothing prunable).
        params_before: parameter count of the input model.
        params_after: parameter count of the pruned model (equals the plan's prediction).
        macs_before: MACs of the input model at the example inputs (conv, linear, matmul, attention).
        macs_after: MACs of the pruned model.
        oracle: the mask-equivalence report when ``verify=True``, else None.
        seconds: wall time of analysis and rewrite.
        parts: submodules pruned piecewise (inside opaque modules, or all of them when the root forward
            cannot be traced), each with its own counts and oracle verdict.
        reconstruction: with ``reconstruct=True``, one ``fxprune.passes.refit.LayerFit`` per refitted
            layer (its calibration error before and after), parts included.
        unhonoured: requests that ended up doing nothing (nothing pruned, no head removed), one sentence
            each; also logged as warnings (``fxprune.honoured``).
    """

    model: nn.Module
    plan: PruningPlan
    modified: bool
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    oracle: OracleReport | None
    seconds: float
    parts: tuple[PartReport, ...] = ()
    unhonoured: tuple[str, ...] = ()
    reconstruction: tuple[Any, ...] = ()
