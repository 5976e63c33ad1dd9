"""Piecewise compilation of the parts of a model that torch.fx cannot capture as a whole.

When the root forward is untraceable (detection models that iterate over a list of images, Hugging Face
models, the Detect head of Ultralytics), fxprune runs the model once, records how each submodule is
called, and compiles the largest traceable submodules one by one: each is a separate graph whose inputs
and outputs are pinned, so pruning inside it never changes what the rest of the model sees. Each part is
proven on its own (the mask oracle on the part, and the write-back into the user's classes must equal the
part's pruned graph), and the parts are put back into a private copy of the model. Fused mixture-of-experts
modules (3D expert weights behind a data-dependent loop) are pruned expert by expert by ``fxprune.experts``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fxprune import experts
from fxprune.errors import FxPruneError
from fxprune.importance_taylor import WholeModelGradients
from fxprune.part_outcomes import Failed, PartOutcome, Pruned, Untraced, outcome_of
from fxprune.passes.eager_check import restore_state
from fxprune.passes.select import Policy, lone_keep
from fxprune.passes.ties import retie
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)



# compile_fn(part, inputs, ignore, calibration, gradients, name[, targets=]) -> PartOutcome; calibration: the
# part's own inputs per calibration batch; gradients: the part's own criterion when its scores need the whole
# model (else None); name: the part's qualified name in the root ("" for a module that is no part of it);
# ``targets``, given with ``sequential`` only, are what the unpruned model fed the part, batch for batch with
# ``calibration``. An error it raises (rather than returns as ``Failed``) stops the whole walk (a replay).
CompilePart = Callable[..., PartOutcome]


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    count: int = 1


class _Bound(nn.Module):
    """Calls ``inner`` with its recorded non-tensor arguments bound; only the tensors are inputs."""

    def __init__(self, inner: nn.Module, call: _Call) -> None:
        super().__init__()
        self.inner = inner
        self.train(inner.training)
        flat, self._spec = torch.utils._pytree.tree_flatten((call.args, call.kwargs))
        self._slots = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        self._consts = [None if isinstance(v, torch.Tensor) else v for v in flat]  # tensor slots: filled at call

    def forward(self, *tensors: torch.Tensor) -> Any:
        flat = list(self._consts)
        for slot, t in zip(self._slots, tensors, strict=True):
            flat[slot] = t
        args, kwargs = torch.utils._pytree.tree_unflatten(flat, self._spec)
        return self.inner(*args, **kwargs)

    def tensors(self, call: _Call) -> tuple[torch.Tensor, ...]:
        flat, _ = torch.utils._pytree.tree_flatten((call.args, call.kwargs))
        return tuple(flat[i] for i in self._slots)

    def fits(self, call: _Call) -> bool:
        """Whether ``call`` has this binding's structure and non-tensor arguments (its tensors can be fed)."""
        flat, spec = torch.utils._pytree.tree_flatten((call.args, call.kwargs))
        if spec != self._spec:
            return False
        slots = set(self._slots)  # by position: a recorded ``None`` argument is a constant, not a tensor slot
        return all(
            isinstance(v, torch.Tensor) if i in slots else (not isinstance(v, torch.Tensor) and _same(v, c))
            for i, (v, c) in enumerate(zip(flat, self._consts, strict=True))
        )


def fed_batches(name: str, bound: _Bound, calls: list[_Call | None]) -> list[tuple[torch.Tensor, ...]]:
    """The tensors of every calibration call of part ``name`` that ``bound`` can be fed (None: the batch never
    called it); the user's data not all used is said by default, as a warning."""
    got = [bound.tensors(c) for c in calls if c is not None and bound.fits(c)]
    if len(got) < len(calls):
        log.warning("fxprune: part %s: only %d of %d calibration batches call it with the example's non-tensor "
                    "arguments; the others are not used for this part", name, len(got), len(calls))
    return got


def oracle_verdict(oracle: Any) -> str:
    """A part's oracle in a word for its report: "passed", the reason it did not apply, or "" (not run)."""
    return "" if oracle is None else ("passed" if oracle.applicable and oracle.passed else oracle.reason)


def _same(a: Any, b: Any) -> bool:
    """Whether two recorded non-tensor arguments are the same constant (identity first: objects whose ``==``
    is not a bool, such as arrays, count as different unless they are the same object)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an ``==`` that cannot answer means "not known to be equal"
        return False


@dataclass
class PartReport:
    """What happened to one part: compiled (with counts) or skipped (with the reason)."""

    name: str
    params_before: int = 0
    params_after: int = 0
    oracle: str = ""
    skipped: str = ""
    children: list[str] = field(default_factory=list)


def record_calls(root: nn.Module, scope: nn.Module, inputs: tuple[Any, ...]) -> dict[str, _Call]:
    """Run ``root`` once and record the first call of every submodule of ``scope`` (names relative to it)."""
    calls: dict[str, _Call] = {}
    names = {id(m): n for n, m in scope.named_modules() if n}
    hooks = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = names[id(mod)]
        if name in calls:
            calls[name].count += 1
        else:
            calls[name] = _Call(tuple(args), dict(kwargs))

    for m in scope.modules():
        if id(m) in names:
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            root(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


@contextlib.contextmanager
def no_kv_cache(root: nn.Module) -> Iterator[None]:
    """Switch Hugging Face key/value caches off (``config.use_cache``) while parts are recorded and traced.

    A cache is state, not an input: recorded calls and traced parts would capture it as constants.
    """
    configs = {id(c): c for m in root.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _part_ignore(full: str, ignore: list[str | type]) -> list[str | type] | None:
    """The user's ``ignore`` seen from inside the part ``full`` (None: the whole part is ignored)."""
    inside: list[str | type] = []
    for item in ignore:
        if isinstance(item, type):
            inside.append(item)
        elif full == item or full.startswith(item + "."):
            return None
        elif item.startswith(full + "."):
            inside.append("inner." + item[len(full) + 1 :])
    return inside


def _prune_experts(child: nn.Module, full: str, call: _Call, policy: Policy, importance: Any,
                   calibration: list[_Call] | None, gradients: WholeModelGradients | None, ignore: list[Any],
                   ) -> tuple[nn.Module | None, PartReport]:
    """A fused-experts part pruned by ``fxprune.experts`` (each expert keeps what ``policy`` keeps of a free
    group of its inner width), with its report; None and a skipped report when it is not (ignored by type,
    the criterion cannot score it, the oracle failed)."""
    if any(isinstance(t, type) and isinstance(child, t) for t in ignore):
        return None, PartReport(full, skipped="ignored by the user")
    before = sum(p.numel() for p in child.parameters())
    try:
        own = None if gradients is None else gradients.for_part(child, full)
        k = lone_keep(experts.layout(child).inner, policy)  # type: ignore[union-attr]
        done = experts.prune_experts(child, k, [(call.args, call.kwargs)], importance if own is None else own,
                                     None if own is None else own.grads,
                                     None if calibration is None else [(c.args, c.kwargs) for c in calibration])
    except FxPruneError as e:
        return None, PartReport(full, skipped=f"{type(e).__name__}: {str(e)[:200]}")
    assert done is not None  # the layout was checked by the caller
    pruned, diff = done
    pruned.train(child.training)
    after = sum(p.numel() for p in pruned.parameters())
    log.info("fxprune: experts %s %d -> %d parameters (oracle max diff %.3g)", full, before, after, diff)
    return pruned, PartReport(full, before, after, "passed")


def compile_parts(
    root: nn.Module,
    scope: nn.Module,
    scope_name: str,
    inputs: tuple[Any, ...],
    compile_fn: CompilePart,
    ignore: list[str | type] | None = None,
    only: str | None = None,
    calibration: list[tuple[Any, ...]] | None = None,
    importance: Any = None,
    expert_policy: Policy | None = None,
    sequential: bool = False,
) -> list[PartReport]:
    """Prune the largest traceable submodules of ``scope`` in place (``root`` is a private copy).

    Each part is pruned by ``compile_fn(part, its_inputs, its_ignore, ..., its_name)``, which returns the part's
    ``PruneResult`` with ``output="module"`` (the pipeline passes its own per-part compile). Returns one report
    per part tried. Parts called more than once, with no tensor input, or named in ``ignore`` (full module
    names, or types) are left alone. With ``only``, just that child of ``scope`` (tried whole first, then its
    children). ``calibration`` batches (the root's inputs) are run through the root too, and each part is
    given what arrived at it (``compile_fn``'s fourth argument; batches whose call differs are dropped).
    An ``importance`` that needs gradients (``fxprune.Taylor``) cannot run the user's batches and loss on a
    part: it is run once on the whole ``root``, before any part changes, and each part is scored by the
    gradients of its own parameters (``compile_fn``'s fifth argument; None for other criteria). A fused
    mixture-of-experts module (``fxprune.experts.layout``) is never traced: each of its experts is pruned by
    ``fxprune.experts`` to the count ``expert_policy`` keeps of a free group of its inner width, and proven by
    its own oracle (no ``expert_policy``: left to ``compile_fn``, as a replay does). With ``sequential``, each part's
    calibration inputs are recorded just before it is compiled, from the root with the parts before it already
    pruned (what reconstruction fits on: the pruned upstream, as SlimGPT does), not once up front.
    """
    reports: list[PartReport] = []
    calls: dict[str, _Call] = {}
    calibration_calls: list[dict[str, _Call]] = []
    unpruned_calls: list[dict[str, _Call]] = []  # with ``sequential``: recorded before any part changes
    gradients: WholeModelGradients | None = None  # set below, before the first part is visited

    def part_calibration(name: str, bound: _Bound) -> tuple[list[tuple[Any, ...]] | None, list[tuple[Any, ...]] | None]:
        """The part's calibration batches and, with ``sequential``, what the unpruned model gave it on the same
        batches (the refit's targets; None when they do not line up)."""
        if calibration is None:
            return None, None
        if not sequential:
            return fed_batches(name, bound, [c.get(name) for c in calibration_calls]), None
        with kept_buffers(root):  # what the parts pruned so far give this one
            calibration_calls[:] = [record_calls(root, scope, batch) for batch in calibration]
        pairs = [(c.get(name), o.get(name)) for c, o in zip(calibration_calls, unpruned_calls, strict=True)]
        batches = fed_batches(name, bound, [c for c, _ in pairs])
        targets = [bound.tensors(o) for c, o in pairs
                   if c is not None and bound.fits(c) and o is not None and bound.fits(o)]
        return batches, targets if len(targets) == len(batches) else None

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            full = f"{scope_name}.{name}" if scope_name else name
            call = calls.get(name)
            if only is not None and not prefix and child_name != only:
                continue
            if isinstance(parent, _Bound):  # this part as a whole just failed to trace: never retry it
                visit(child, name)
                continue
            if call is None or call.count > 1 or not any(True for _ in child.parameters()):
                if call is not None and call.count > 1:
                    reports.append(PartReport(full, skipped=f"called {call.count} times"))
                elif call is None:
                    visit(child, name)  # containers (ModuleList) are never called: look inside
                continue
            inside = _part_ignore(full, list(ignore or []))
            if inside is None:
                reports.append(PartReport(full, skipped="ignored by the user"))
                continue
            if expert_policy is not None and experts.layout(child) is not None:  # fused: pruned expert by expert
                cal = None if calibration is None else [c[name] for c in calibration_calls if name in c]
                pruned_experts, report = _prune_experts(child, full, call, expert_policy, importance, cal,
                                                        gradients, inside)
                if pruned_experts is not None:
                    setattr(parent, child_name, pruned_experts)
                reports.append(report)
                continue
            bound = _Bound(child, call)
            tensors = bound.tensors(call)
            if not tensors:
                reports.append(PartReport(full, skipped="no tensor inputs"))
                continue
            ready = outcome_of(lambda b=bound, f=full, n=name: (
                None if gradients is None else gradients.for_part(b, f), *part_calibration(n, b)))
            if isinstance(ready, Pruned):  # its gradients and batches: compiled
                own, batches, targets = ready.result
                outcome = compile_fn(bound, tensors, inside, batches, own, full,
                                     **({"targets": targets} if targets else {}))
            else:
                outcome = ready
            if isinstance(outcome, Untraced):
                visit(child, name)  # not compiled as a whole: try its children
                continue
            if isinstance(outcome, Failed):
                reports.append(PartReport(full, skipped=outcome.reason))
                visit(child, name)  # the whole failed its proof: its children may still be pruned
                continue
            result = outcome.result
            if not gc.isenabled():  # paused by the enclosing compile: this part's copy and graphs go now
                gc.collect()
            pruned = result.model.inner  # type: ignore[union-attr]
            pruned.train(child.training)
            setattr(parent, child_name, pruned)
            verdict = oracle_verdict(result.oracle)
            if result.oracle is None and result.parts:  # pruned part by part itself: proven by its own parts' oracles
                changed = [p for p in result.parts if p.params_after < p.params_before]
                bad = next((p for p in changed if p.oracle != "passed"), None)
                verdict = "passed" if changed and bad is None else (f"{bad.name}: {bad.oracle}" if bad else "")
            reports.append(PartReport(full, result.params_before, result.params_after, verdict,
                                      children=[f"{full}.{p.name.removeprefix('inner.')}" for p in result.parts]))
            log.info("fxprune: part %s %d -> %d parameters", full, result.params_before, result.params_after)

    with no_kv_cache(root):
        calls.update(record_calls(root, scope, inputs))
        calibration_calls.extend(record_calls(root, scope, batch) for batch in calibration or ())
        if sequential:
            unpruned_calls.extend(calibration_calls)
        gradients = WholeModelGradients.of(root, importance)  # before the first part is replaced
        visit(scope, "")
    return reports


def settle_parts(result: nn.Module, original: nn.Module, refitted: frozenset[str] = frozenset()) -> None:
    """Each part was copied privately: ties into it and state (a recording run may update buffers) come
    from the caller's model again, except the tensors a refit wrote (``refitted``: qualified names).
    (Training flags are restored by the caller, after its last eval run.)"""
    retie(result, original)
    restore_state(result, original, skip=refitted)
    share_configs(result, original)


def share_configs(result: nn.Module, original: nn.Module) -> None:
    """Modules that shared one ``config`` object in the caller's model share one again: the outermost one's.

    A part compiled on its own holds a private copy of the shared Hugging Face config, taken while the
    key/value cache was switched off for recording (``no_kv_cache``); left apart, the pruned model's inner
    model would return no cache while its root's config says ``use_cache=True``. Widths are written into
    the shared config afterwards (``hf_config.sync_config`` on the whole model). What a part's compile wrote
    into its copy (Phi-3's forward reads its head counts from the config at run time) is carried over."""
    mine = dict(result.named_modules())
    first: dict[int, Any] = {}
    for name, m in original.named_modules():
        config, twin = getattr(m, "config", None), mine.get(name)
        if config is None or twin is None or not hasattr(config, "to_dict") or not hasattr(twin, "config"):
            continue
        if id(config) not in first:
            first[id(config)] = twin.config
            if hasattr(config, "use_cache") and twin.config is not config:  # switched off for recording only
                twin.config.use_cache = config.use_cache
        elif twin.config is not first[id(config)]:
            for key, value in vars(twin.config).items():
                if key != "use_cache" and not _same(value, vars(config).get(key, _MISSING)):
                    setattr(first[id(config)], key, value)
            twin.config = first[id(config)]


_MISSING = object()
