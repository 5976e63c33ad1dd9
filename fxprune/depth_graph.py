"""Depth pruning of any traced model: residual units found in the FX graph, removed by calibration loss.

A residual unit is an add ``s + b`` (``operator.add``/``iadd``, ``torch.add``, ``Tensor.add``, no ``alpha``) of
two tensors of one shape whose branch ``b`` is a function of the shortcut ``s`` alone: ``s`` is an ancestor of
``b`` and every path from an input into the branch passes through ``s`` (parameters and constants aside). A
torchvision ``BasicBlock`` is one; a block with a downsample shortcut is not. A unit is named by the module
holding its branch (the deepest module path common to what the branch calls), and the adds of one module are
ONE unit, removed together: a ViT encoder block's attention and MLP branches are ``encoder.layers.encoder_layer_3``.

Removing a unit replaces its adds by their shortcuts (the branches taken as zero) and deletes what only the
branches read: ``relu(out + identity)`` becomes ``relu(identity)``, exact whatever the input's sign. Units go
greedily, every remaining one tried at each step, by calibration loss: by default the mean squared difference
to the unpruned output, relative to its mean square (the next-token loss for token ids -> logits). The proof
runs the ORIGINAL graph in float64 with zeros for the removed branches at their adds, and the pruned graph in
float64: they must agree to 1e-9 of the output's scale, else ``InvariantError``. The caller's model is only read.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from fxprune import fast
from fxprune.calibration import checked_batches
from fxprune.copying import private_copy
from fxprune.depth_common import Loss, next_token_loss, removal_count
from fxprune.errors import ArgumentError, InvariantError, first_line
from fxprune.metrics import count_params
from fxprune.outputs import restore_output_class, tensors_of
from fxprune.passes.eager_check import check_graph_matches_eager, restore_state
from fxprune.passes.trace import trace
from fxprune.passes.verify import OracleReport, _Float64
from fxprune.rules.registry import has_trait
from fxprune.state import kept_buffers
from fxprune.validate import check_model

log = logging.getLogger(__name__)

TOL = 1e-9  # float64 on both sides: |pruned - reference| <= TOL * max|reference|


@dataclass(frozen=True)
class ResidualAdd:
    """A residual add, by node names: ``add`` reads ``shortcut`` at ``args[position]``, ``branch`` computes the
    other operand from it reading ``feeds`` (parameters, constants); ``read_after``: the shortcut is read after
    the add (its replacement is then a copy, which an in-place op on the add's result cannot reach)."""

    add: str
    shortcut: str
    position: int
    branch: frozenset[str]
    feeds: frozenset[str]
    read_after: bool


@dataclass(frozen=True)
class Unit:
    """A residual unit: the adds whose branches one module holds, removed together."""

    name: str
    adds: tuple[ResidualAdd, ...]


@dataclass(frozen=True)
class GraphDepthResult:
    """What ``prune_depth`` did to a model without a block list (or with ``blocks="graph"``).

    Attributes:
        model: the pruned private copy, a GraphModule in eval mode.
        blocks: ``"graph"``.
        units: the names of every residual unit found, in graph order.
        removed: the names of the removed units, in the order they were chosen.
        loss_before: the calibration loss of the model.
        loss_after: the calibration loss of the result.
        steps: for each removal, ``(unit, loss)`` of every unit tried at that step.
        influence: ``(unit, 1 - cosine(unit input, unit output))`` averaged over calibration positions.
        params_before: parameters of the model.
        params_after: parameters of the result.
        oracle: the float64 proof (passed, and the largest difference).
    """

    model: fx.GraphModule
    blocks: str
    units: tuple[str, ...]
    removed: tuple[str, ...]
    loss_before: float
    loss_after: float
    steps: tuple[tuple[tuple[str, float], ...], ...]
    influence: tuple[tuple[str, float], ...]
    params_before: int
    params_after: int
    oracle: OracleReport


def _is_add(n: fx.Node) -> bool:
    """An add of two distinct nodes, without ``alpha`` or ``out``."""
    if n.kwargs or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args) or n.args[0] is n.args[1]:
        return False
    return has_trait(n, "residual_add")


def _branch(b: fx.Node, s: fx.Node, fed: set[fx.Node], order: dict[fx.Node, int]) -> tuple[set[fx.Node], set[fx.Node]] | None:
    """The nodes computing ``b`` from ``s`` and what they read that no input feeds; None unless ``b`` reads
    ``s`` and every path from an input to ``b`` passes through ``s``."""
    nodes: set[fx.Node] = set()
    feeds: set[fx.Node] = set()  # parameters, buffers, constants
    reads_s, stack = False, [b]
    while stack:
        n = stack.pop()
        if n is s:
            reads_s = True
        elif n in nodes or n in feeds:
            continue
        elif n not in fed:
            feeds.add(n)
        elif order[n] < order[s] or n.op == "placeholder":
            return None  # computed from an input before s exists: a path that avoids s
        else:
            nodes.add(n)
            stack.extend(n.all_input_nodes)
    return (nodes, feeds) if reads_s else None


def residual_adds(graph: fx.Graph) -> list[ResidualAdd]:
    """Every add of ``graph`` whose operand is a function of its other operand alone (shapes not checked)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    fed: set[fx.Node] = set()  # nodes an input reaches
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in fed for a in n.all_input_nodes):
            fed.add(n)
    found = []
    for n in (n for n in graph.nodes if _is_add(n)):
        for position in (0, 1):  # the shortcut's: an add may read its operands either way round
            s, b = cast(fx.Node, n.args[position]), cast(fx.Node, n.args[1 - position])
            parts = _branch(b, s, fed, order)
            if parts is not None:
                later = any(u is not n and u not in parts[0] and order[u] > order[n] for u in s.users)
                found.append(ResidualAdd(n.name, s.name, position, frozenset(m.name for m in parts[0]),
                                         frozenset(m.name for m in parts[1]), later))
                break
    return found


def _unit_name(gm: fx.GraphModule, add: ResidualAdd) -> str:
    """The deepest module path common to what the branch calls and reads (the add's node name if none)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    paths = []
    for name in add.branch | add.feeds:
        n = nodes[name]
        if n.op == "call_module":
            paths.append(str(n.target).split("."))
        elif n.op == "get_attr" and "." in str(n.target):  # a root-level one is a constant the tracer made
            paths.append(str(n.target).split(".")[:-1])
        elif n.meta.get("nn_module_stack"):  # an op in a traced-through module's forward: (path, class)
            paths.append(str(list(n.meta["nn_module_stack"].values())[-1][0]).split("."))
    return ".".join(os.path.commonprefix(paths)) or add.add  # commonprefix compares lists item by item


class _Probe(fx.Interpreter):
    """Runs the unpruned graph: which adds see two tensors of one shape and an unwritten shortcut, and the
    block influence ``1 - cosine(input, output)`` of each unit (its first add's shortcut, its last add)."""

    def __init__(self, gm: fx.GraphModule, adds: Sequence[ResidualAdd], units: Sequence[Unit] = ()) -> None:
        super().__init__(gm)
        self.adds, self.shortcuts = {a.add: a for a in adds}, {a.shortcut for a in adds}
        self.versions: dict[str, int] = {}  # of each shortcut when made: an in-place write bumps it
        self.ok: dict[str, bool] = {}
        self.first, self.last = {u.adds[0].add: u.name for u in units}, {u.adds[-1].add: u.name for u in units}
        self.inputs: dict[str, torch.Tensor] = {}
        self.influence: dict[str, list[float]] = {u.name: [0.0, 0.0] for u in units}  # sum, count

    def run_node(self, n: fx.Node) -> Any:
        a = self.adds.get(n.name)
        if a is not None:
            s, b = self.env[n.args[a.position]], self.env[n.args[1 - a.position]]  # type: ignore[index]
            self.ok[n.name] = (isinstance(s, torch.Tensor) and isinstance(b, torch.Tensor) and s.is_floating_point()
                               and s.shape == b.shape and self.versions.get(a.shortcut) == s._version)
            if n.name in self.first:
                self.inputs[self.first[n.name]] = s.detach().clone()
        out = super().run_node(n)
        if n.name in self.shortcuts and isinstance(out, torch.Tensor):
            self.versions[n.name] = out._version
        unit = self.last.get(n.name)
        before = self.inputs.pop(unit) if unit is not None else None
        if unit is not None and before is not None and before.shape == out.shape:
            dim = 1 if out.dim() >= 4 else -1  # channels of an image, the hidden size of a sequence
            cos = torch.nn.functional.cosine_similarity(before.double(), out.double(), dim=dim)
            self.influence[unit][0] += float((1 - cos).sum())
            self.influence[unit][1] += cos.numel()
        return out


def find_units(gm: fx.GraphModule, example: tuple[Any, ...]) -> tuple[Unit, ...]:
    """The residual units of ``gm`` in graph order, the shapes checked on a run with ``example``."""
    adds = residual_adds(gm.graph)
    probe = _Probe(gm, adds)
    with torch.no_grad(), kept_buffers(gm):
        probe.run(*example)
    units: dict[str, list[ResidualAdd]] = {}
    for a in (a for a in adds if probe.ok.get(a.add)):
        units.setdefault(_unit_name(gm, a), []).append(a)
    return tuple(Unit(name, tuple(members)) for name, members in units.items())


def _shortcut_value(graph: fx.Graph, add: fx.Node, shortcut: fx.Node, copied: bool) -> fx.Node:
    """What the add's readers read once its branch is gone: the shortcut (a copy when it is read later)."""
    if not copied:
        return shortcut
    with graph.inserting_before(add):
        return graph.call_method("clone", (shortcut,))


def without(gm: fx.GraphModule, units: Iterable[Unit]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules whose graph is ``gm``'s with ``units`` removed: each add replaced
    by its shortcut, then the nodes of the removed branches that nothing reads any more deleted."""
    out = fast.deferred_graph_module(gm, copy.deepcopy(gm.graph), type(gm).__name__)  # code made on first call
    graph = out.graph
    nodes = {n.name: n for n in graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    replaced: dict[str, fx.Node] = {}
    gone: set[str] = set()  # the removed branches' nodes (and the copies made), deleted when nothing reads them
    feeds: set[str] = set()  # what they read that no input feeds (parameters): deleted likewise
    # in graph order: an add's shortcut may be an earlier removed add (a ViT block's MLP add reads the attention's)
    for a in sorted((a for u in units for a in u.adds), key=lambda a: order[a.add]):
        add = nodes[a.add]
        value = _shortcut_value(graph, add, replaced.get(a.shortcut, nodes[a.shortcut]), a.read_after)
        add.replace_all_uses_with(value)
        graph.erase_node(add)
        replaced[a.add] = value
        gone |= a.branch | ({value.name} if value.name not in nodes else set())
        feeds |= a.feeds
    for n in graph.nodes:  # what reads a removed branch and nothing else is gone too (an attention's unused weights)
        inputs = n.all_input_nodes
        if (n.op != "output" and any(m.name in gone for m in inputs)
                and all(m.name in gone or m.name in feeds or m.op == "get_attr" for m in inputs)):
            gone.add(n.name)
    for n in reversed(list(graph.nodes)):  # only these: the rest of the graph is the model's, side effects included
        if (n.name in gone or n.name in feeds) and not n.users and not n.is_impure():
            graph.erase_node(n)
    graph.lint()
    out.recompile()
    return out


def _relative_error(out: Any, ref: Any) -> float:
    """Mean squared difference of the floating outputs, relative to the reference's mean square."""
    pairs = [(g.double(), w.double()) for g, w in zip(tensors_of(out), tensors_of(ref), strict=True)
             if w.is_floating_point()]
    num, den = sum(float((g - w).pow(2).sum()) for g, w in pairs), sum(float(w.pow(2).sum()) for _, w in pairs)
    return num / den if den > 0 else num


def _token_logits(out: Any, batch: tuple[Any, ...]) -> bool:
    """Whether the model maps token ids (``batch[0]``) to logits over them (the next-token loss applies)."""
    ids, first = batch[0], next(iter(tensors_of(out)), None)
    return (isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2 and first is not None
            and first.dim() == 3 and first.shape[:2] == ids.shape)


class _ZeroedBranches(_Float64):
    """The unpruned graph in float64, with zeros for the removed branches at their adds (the reference)."""

    def __init__(self, gm: fx.GraphModule, adds: Iterable[ResidualAdd]) -> None:
        super().__init__(gm)
        self.branch_at = {a.add: 1 - a.position for a in adds}

    def run_node(self, n: fx.Node) -> Any:
        where = self.branch_at.get(n.name)
        if where is None:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = tuple(torch.zeros_like(v) if i == where else v for i, v in enumerate(args))
            return getattr(self, n.op)(n.target, args, kwargs)


def depth_oracle(reference: fx.GraphModule, pruned: fx.GraphModule, units: Iterable[Unit],
                 inputs: Iterable[tuple[Any, ...]]) -> OracleReport:
    """The depth mask oracle: ``pruned`` against ``reference`` (the unpruned graph) with the branches of ``units``
    giving zero at their adds, both run in float64 on each of ``inputs``.

    Returns:
        The report: passed when every output agrees to ``TOL`` of its largest magnitude.
    """
    adds = [a for u in units for a in u.adds]
    worst, passed = 0.0, True
    for batch in inputs:
        batch64 = pytree.tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, batch)
        with torch.no_grad(), kept_buffers(reference, pruned):
            want = tensors_of(_ZeroedBranches(reference, adds).run(*batch64))
            got = tensors_of(_Float64(pruned).run(*batch64))
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
            return OracleReport(True, "the outputs differ in number or shape", float("inf"), False)
        for g, w in zip(got, want, strict=True):
            diff = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
            scale = float(w.double().abs().max()) if w.numel() else 0.0
            worst, passed = max(worst, diff), passed and diff <= TOL * (scale or 1.0)
    return OracleReport(True, "", worst, passed)


def prune_graph_depth(model: nn.Module, remove: float, *, calibration: Sequence[Any], loss_fn: Loss | None = None,
                      example_inputs: Any = None) -> GraphDepthResult:
    """Remove ``remove`` residual units (a count, or a fraction of the units) of ``model``'s traced graph,
    chosen greedily by calibration loss, and prove the result in float64.

    Args:
        model: the model (only read: the result is a pruned GraphModule of a private copy).
        remove: how many units go (an int), or which fraction of them (a float in (0, 1)).
        calibration: batches of model inputs (a tensor or a tuple of positional tensors each).
        loss_fn: ``(output, batch) -> scalar loss``; default the relative squared error to the unpruned
            output (the next-token loss when the model maps token ids to logits).
        example_inputs: the model's inputs, to trace with (default: the first batch).

    Raises:
        ArgumentError: a bad count, no residual unit, or inputs that do not run.
        TraceError: the model cannot be traced, or its graph differs from eager PyTorch.
        InvariantError: the pruned graph is not the original with the removed branches zeroed.
    """
    check_model(model)
    given = None if example_inputs is None else (
        tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    batches = tuple(b if isinstance(b, tuple) else (b,) for b in checked_batches(calibration, given))
    example, what = given or batches[0], type(model).__name__
    work = private_copy(model)  # everything below runs on the copy only
    gm, opaque = trace(work, (), len(example), example)
    if gm.meta.get("fxprune_example_values", True):
        restore_state(work, model)  # tracing with example values ran the copy
    output_type = check_graph_matches_eager(gm, work, model, example)  # the graph must be the model
    reference = fast.deferred_graph_module(gm, copy.deepcopy(gm.graph), what)  # own containers: gm is pruned
    try:
        units = find_units(gm, example)
    except Exception as e:
        raise ArgumentError(f"example_inputs do not run through {what}: {first_line(e, typed=True)}") from e
    if not units:
        kept = f" (kept whole, untraceable: {', '.join(sorted(opaque))})" if opaque else ""
        raise ArgumentError(f"{what} has no residual unit (an add of x and a function of x alone, of one shape) "
                            f"in its traced graph{kept} for depth pruning to remove; prune its width instead")
    count = removal_count(remove, len(units))
    refs, probe = [], _Probe(reference, [a for u in units for a in u.adds], units)  # the unpruned outputs
    with torch.no_grad(), kept_buffers(gm):
        for k, batch in enumerate(batches):
            try:
                refs.append(probe.run(*batch))
            except Exception as e:
                raise ArgumentError(f"calibration batch {k} does not run through {what} ({first_line(e, typed=True)})"
                                    "; give batches like example_inputs") from e
    language = loss_fn is None and _token_logits(refs[0], batches[0])

    def loss_of(removed: list[Unit]) -> float:
        candidate, total = without(gm, removed), 0.0
        with torch.no_grad(), kept_buffers(gm):
            for k, batch in enumerate(batches):
                out = candidate(*batch)
                loss = loss_fn(out, batch) if loss_fn else next_token_loss(out, batch) if language else None
                total += float(loss if loss is not None else _relative_error(out, refs[k]))
        return total / len(batches)

    before, live, chosen, steps = loss_of([]), list(units), [], []
    while live and len(chosen) < count:
        tried = tuple((u.name, loss_of([*chosen, u])) for u in live)
        best = min(tried, key=lambda t: t[1])[0]
        chosen.append(next(u for u in live if u.name == best))
        steps.append(tried)
        log.info("fxprune: depth: unit %s removed (calibration loss %.4g)", best, dict(tried)[best])
        left = {n.name for n in without(gm, chosen).graph.nodes}  # a unit inside a removed one went with it
        live = [u for u in live if u not in chosen and any(a.add in left for a in u.adds)]
    gm.graph = without(gm, chosen).graph  # gm keeps the state_dict entries tracing carried over
    gm.delete_all_unused_submodules()
    restore_output_class(gm, output_type)  # a ModelOutput, not the plain dict fx traced
    fast.generated(gm)  # a plain GraphModule, its code generated
    oracle = depth_oracle(reference, gm, chosen, {id(b): b for b in (example, batches[-1])}.values())
    if not oracle.passed:
        raise InvariantError(f"depth oracle: the pruned {what} differs from the original with the branches of "
                             f"{[u.name for u in chosen]} zeroed by {oracle.max_abs_diff:.3g} (float64)")
    influence = tuple((name, total / n if n else float("nan")) for name, (total, n) in probe.influence.items())
    return GraphDepthResult(gm, "graph", tuple(u.name for u in units), tuple(u.name for u in chosen), before,
                            dict(steps[-1])[chosen[-1].name] if chosen else before, tuple(steps), influence,
                            count_params(model), count_params(gm), oracle)
