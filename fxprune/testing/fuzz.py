"""Fuzz cases against ``fxprune.prune``: the per-case checks, a greedy shrinker and regression-test files.

A case is a random network (``netgen.random_spec(seed)``) pruned twice with ``verify=True``: once with a
random plan (``random_importance(seed)``) and once with L2 importance, each at its own random ratio in
[0.1, 0.9]. ``check_case`` asserts what the oracle inside ``prune`` does not: output structure and
shapes, an honest ``modified`` flag and parameter count, an untouched caller's model, and (for one
case in ``onnx_every``) an onnxruntime-verified ONNX export. The only clean refusal is
an ``ExportError`` that the unpruned model raises too (a limit of the torch
exporter, not of fxprune); any other exception is a failure.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import json
import logging
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import fxprune
from fxprune.metrics import count_params
from fxprune.outputs import tensors_of
from fxprune.passes.importance import random_importance
from fxprune.state import kept_buffers
from fxprune.testing.invalid import InvalidNet
from fxprune.testing.netgen import random_spec
from fxprune.testing.netspec import NetSpec, Step, build, to_source
from fxprune.testing.refit_check import TOLERANCE as REFIT_TOLERANCE
from fxprune.testing.refit_check import refit_gaps
from fxprune.testing.trust_ops import STATE_REFUSAL


class FuzzCheckError(AssertionError):
    """A fuzz invariant that ``prune`` does not check itself broke (structure, counts, caller's model)."""


@dataclass(frozen=True)
class Run:
    """One prune of a case: which importance, at which ratio, and whether its ONNX export is checked."""

    importance: str  # "random" (random_importance(seed)) or "l2"
    ratio: float
    onnx: bool = False
    reconstruct: bool = False  # refit the consumers on two seeded calibration batches (reconstruct=True)
    heads: bool | str = False  # prune_heads: whole heads (True) or query heads inside key/value groups

    def scorer(self, seed: int) -> Any:
        return random_importance(seed) if self.importance == "random" else self.importance  # "l2", "activation"


@dataclass(frozen=True)
class CaseResult:
    """Outcome of one fuzz case.

    Attributes:
        seed: the case.
        status: "ok", "unsupported" (a clean refusal, see the module docstring) or "fail".
        error: ``Type: first line`` of the failure ("" when ok).
        run: the run that failed (None when ok).
        n_steps: ops in the network.
        modified: whether some run removed channels.
        oracle_skipped: the oracle's reason when it was not applicable in some run ("" otherwise).
        onnx_checked: whether an ONNX export was verified.
        seconds: wall time of the case.
    """

    seed: int
    status: str
    error: str
    run: Run | None
    n_steps: int
    modified: bool
    oracle_skipped: str
    onnx_checked: bool
    seconds: float


def case_runs(seed: int, onnx_every: int = 20) -> tuple[Run, Run]:
    """The two prunes of case ``seed`` (ratios drawn from the seed; ONNX on one case in ``onnx_every``; the L2
    run reconstructs on one case in four)."""
    r = random.Random(seed * 1_000_003 + 17)
    onnx = onnx_every > 0 and seed % onnx_every == 0
    second = "activation" if seed % 4 == 2 else "l2"  # activation-aware on calibration batches, one case in 4
    heads = (False, True, "query")[seed % 3]  # the head policies, on the second run
    return (Run("random", round(r.uniform(0.1, 0.9), 3), onnx),
            Run(second, round(r.uniform(0.1, 0.9), 3), reconstruct=seed % 4 == 1, heads=heads))


def _structure(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape), out.dtype)
    if isinstance(out, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in out.items()))
    if isinstance(out, (list, tuple)):
        return (type(out).__name__, tuple(_structure(o) for o in out))
    return (type(out).__name__,)


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise FuzzCheckError(what)


def check_case(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float, importance: Any, *,
    onnx_path: str | None = None, dynamic_batch: bool = True, replay: bool = False, reconstruct: bool = False,
    heads: bool | str = False,
) -> fxprune.PruneResult:
    """Prune ``model`` with ``verify=True`` and assert the fuzz invariants.

    With ``dynamic_batch`` (the model does not spell its batch size), both models also run at batch 1. With
    ``replay``, the plan, saved to JSON and read back, must replay with ``fxprune.apply`` to the same weights.

    Raises:
        FuzzCheckError: when output structure, the parameter count, the ``modified`` flag or the caller's
            model is wrong; any error ``prune`` or the ONNX export raises propagates.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    text, training = repr(model), model.training
    extra: dict[str, Any] = {}
    if reconstruct or importance == "activation":  # batches of another size when the model allows it
        gen = torch.Generator().manual_seed(len(inputs))
        n = 0 if not dynamic_batch else 1
        extra["calibration"] = [tuple(torch.randn((x.shape[0] + n, *x.shape[1:]), generator=gen) for x in inputs)
                                for _ in range(2)]
    if reconstruct:  # the refit must stay exact: the oracle proves pruned == refitted model with zeros
        extra["reconstruct"] = True
    if heads:
        extra["prune_heads"] = heads
    with _dropped_batches() as dropped:
        result = fxprune.prune(model, ratio, example_inputs=inputs, importance=importance, verify=True, **extra)
    _expect(not dropped, f"calibration batches did not reach a part: {dropped[:1]}")
    after = model.state_dict()
    _expect(repr(model) == text and model.training == training, "prune changed the caller's model (attributes)")
    _expect(state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state),
            "prune changed the caller's model (parameters or buffers)")
    _expect(result.oracle is not None, "verify=True gave no oracle report")
    with kept_buffers(model, result.model):  # the checks' calls leave no state behind (a forward's counter)
        _check_result(model, inputs, result, onnx_path, dynamic_batch)
    if reconstruct:  # each refit against a least-squares fit computed from the eager models alone
        gaps = refit_gaps(model, result.model, result.reconstruction, extra["calibration"])
        worst = max(gaps.items(), key=lambda kv: kv[1], default=("", 0.0))
        _expect(worst[1] <= REFIT_TOLERANCE, f"the refit of {worst[0]} is {worst[1]:.3g} of its target's energy worse "
                f"than the least-squares fit on the eager models' own inputs and outputs")
    if replay:  # from the state both models were handed back with
        with kept_buffers(model, result.model):
            _check_replay(model, inputs, result)
    return result


def _check_result(model: nn.Module, inputs: tuple[torch.Tensor, ...], result: fxprune.PruneResult,
                  onnx_path: str | None, dynamic_batch: bool) -> None:
    with torch.no_grad():
        ref, got = model(*inputs), result.model(*inputs)
    _expect(_structure(ref) == _structure(got), f"output structure changed: {_structure(ref)} -> {_structure(got)}")
    _expect(result.params_before == count_params(model), "params_before is not the model's parameter count")
    _expect(result.params_after == count_params(result.model), "params_after is not the pruned parameter count")
    _expect(result.modified == (result.plan.n_dropped > 0), f"modified={result.modified} but the plan drops "
            f"{result.plan.n_dropped} channels")
    if result.modified:
        _expect(result.params_after < result.params_before, f"channels removed but parameters did not drop "
                f"({result.params_before} -> {result.params_after})")
    else:
        _expect(result.params_after == result.params_before, "nothing removed but the parameter count changed")
    if dynamic_batch and all(x.shape[0] > 1 for x in inputs):  # the pruned graph must not bake in the batch
        one = tuple(x[:1] for x in inputs)
        with torch.no_grad():
            ref, got = model(*one), result.model(*one)
        _expect(_structure(ref) == _structure(got), "at batch 1 the pruned model's outputs differ in structure")
    if all(x.dim() == 4 for x in inputs):  # sizes read from tensors must stay computed: other spatial sizes
        bigger = tuple(torch.randn(*x.shape[:2], x.shape[2] + 3, x.shape[3] + 2) for x in inputs)
        try:
            with torch.no_grad():
                ref = model(*bigger)
        except Exception:  # noqa: BLE001 - the original is size-specific (a Linear after flatten): nothing to check
            ref = None
        if ref is not None:
            with torch.no_grad():
                got = result.model(*bigger)
            _expect(_structure(ref) == _structure(got), "at another input size the pruned model's outputs differ")
    train = copy.deepcopy(result.model).train()  # train mode: the eval graph's behaviour, or a clear refusal
    try:
        with torch.no_grad():
            got, ref = train(*inputs), model(*inputs)
        _expect(_structure(got) == _structure(ref), "in train mode the pruned model's outputs differ in structure")
    except fxprune.TrainModeError:
        _expect(bool(getattr(train, "_fxprune_train_differs", "")), "TrainModeError from a model without the guard")
    if onnx_path is not None:
        from fxprune.passes.export import export_onnx

        export_onnx(result.model, inputs, onnx_path, dynamic_batch=dynamic_batch)


@contextlib.contextmanager
def _dropped_batches() -> Iterator[list[str]]:
    """The warnings ``compile_parts`` gives for a part that could not use every calibration batch."""
    found: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "calibration batches" in record.getMessage():
                found.append(record.getMessage())

    handler, logger = Catch(), logging.getLogger("fxprune.partial")
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def _check_replay(model: nn.Module, inputs: tuple[torch.Tensor, ...], result: fxprune.PruneResult) -> None:
    """The plan read back from its JSON replays on ``model``: the same parameters, the same outputs."""
    plan = fxprune.PruningPlan.from_dict(json.loads(json.dumps(result.plan.to_dict())))
    again = fxprune.apply(model, plan, inputs)
    _expect(count_params(again) == result.params_after,
            f"the replayed plan has {count_params(again)} parameters, the pruned model {result.params_after}")
    with torch.no_grad():
        want, got = tensors_of(result.model(*inputs)), tensors_of(again(*inputs))
    _expect(len(want) == len(got) and all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                                          for a, b in zip(want, got, strict=True)),
            "the replayed plan computes other outputs than the pruned model")


def describe(e: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def signature_of_text(error: str) -> str:
    """A failure's kind: the type and the leading words of ``describe``'s text, numbers and names erased."""
    words = re.sub(r"\d+|\b[vx]\d*_?\w*\b|\(.*?\)|\[.*?\]", "#", error).split()
    return " ".join(words[:6])


def signature(e: BaseException) -> str:
    """The kind of failure ``e`` is (see ``signature_of_text``); the shrinker keeps it fixed."""
    return signature_of_text(describe(e))


def run_spec(spec: NetSpec, run: Run) -> fxprune.PruneResult:
    """Build ``spec`` and check one run (with its ONNX export when asked); raise on any failure."""
    model, inputs, _ = build(spec)
    with tempfile.TemporaryDirectory(prefix="fxprune-fuzz-") as tmp:
        # ONNX holds no state update, and opset 18 has no grouped-query attention: not exported
        stateful = any(st.op in ("state", "gqa") for st in spec.steps)
        path = str(Path(tmp) / "m.onnx") if run.onnx and not stateful else None
        return check_case(model, inputs, run.ratio, run.scorer(spec.seed), onnx_path=path,
                          dynamic_batch=not spec.literal_batch, replay=spec.seed % 4 == 0,
                          reconstruct=run.reconstruct, heads=run.heads)


def _original_exports(spec: NetSpec) -> bool:
    from fxprune.passes.export import export_onnx

    model, inputs, _ = build(spec)
    with tempfile.TemporaryDirectory(prefix="fxprune-fuzz-") as tmp:
        try:
            export_onnx(model, inputs, str(Path(tmp) / "m.onnx"), dynamic_batch=not spec.literal_batch)
        except fxprune.ExportError:
            return False
    return True


def classify(spec: NetSpec, run: Run, e: BaseException) -> str:
    """"unsupported" for a clean refusal (or an ONNX export the unpruned model fails too), else "fail"."""
    if isinstance(e, fxprune.ExportError) and run.onnx and not _original_exports(spec):
        return "unsupported"
    lost_state = any(st.op == "state" and st.attrs["kind"] != "copy" for st in spec.steps)
    if isinstance(e, fxprune.TraceError) and lost_state and STATE_REFUSAL in str(e):
        return "unsupported"  # a state update fx runs at trace time: refused, as it must be
    return "fail"


def run_case(seed: int, *, max_nodes: int = 12, onnx_every: int = 20) -> CaseResult:
    """Run fuzz case ``seed`` and classify it; never raises for a failure of fxprune."""
    t0 = time.perf_counter()
    spec = random_spec(seed, max_nodes=max_nodes)
    modified, skipped, onnx = False, "", False
    status, error, failed = "ok", "", None
    for run in case_runs(seed, onnx_every):
        try:
            res = run_spec(spec, run)
        except Exception as e:  # noqa: BLE001 - every exception is a finding or a clean refusal
            status, error, failed = classify(spec, run, e), describe(e), run
            break
        modified |= res.modified
        onnx |= run.onnx
        if res.oracle is not None and not res.oracle.applicable:
            skipped = res.oracle.reason
    return CaseResult(seed, status, error, failed, len(spec.steps), modified, skipped, onnx,
                      time.perf_counter() - t0)


def error_of(spec: NetSpec, run: Run) -> BaseException | None:
    """The error ``spec`` fails with under ``run``; None when it passes, is refused cleanly, or is invalid."""
    try:
        to_source(spec)
    except InvalidNet:
        return None
    try:
        run_spec(spec, run)
    except Exception as e:  # noqa: BLE001 - any failure counts
        return e if classify(spec, run, e) == "fail" else None
    return None


def failure_of(spec: NetSpec, run: Run) -> str | None:
    """The failure signature of ``spec`` under ``run`` (see ``signature``), None when it does not fail."""
    e = error_of(spec, run)
    return None if e is None else signature(e)


MAX_PARTS = 256  # more sections than any split can have


def _without(spec: NetSpec, i: int, via: int) -> NetSpec:
    """Drop step ``i``; whatever read its results reads its input ``via`` instead."""
    st = spec.steps[i]
    src = st.ins[via]
    gone = {st.name} | {f"{st.name}_{k}" for k in range(MAX_PARTS)}

    def sub(v: str) -> str:
        return src if v in gone else v

    steps = tuple(dataclasses.replace(s, ins=tuple(sub(v) for v in s.ins)) for j, s in enumerate(spec.steps) if j != i)
    outputs = tuple(dict.fromkeys(sub(v) for v in spec.outputs))
    return dataclasses.replace(spec, steps=steps, outputs=outputs)


def _without_input(spec: NetSpec, j: int) -> NetSpec:
    """Drop unread input ``x<j>``; later inputs move down one place."""

    def sub(v: str) -> str:
        return f"x{int(v[1:]) - 1}" if v.startswith("x") and int(v[1:]) > j else v

    steps = tuple(dataclasses.replace(s, ins=tuple(sub(v) for v in s.ins)) for s in spec.steps)
    inputs = spec.inputs[:j] + spec.inputs[j + 1 :]
    return dataclasses.replace(spec, inputs=inputs, steps=steps, outputs=tuple(sub(v) for v in spec.outputs))


def _simpler_attrs(st: Step) -> Iterator[dict[str, Any]]:
    a = st.attrs
    if a.get("bias"):
        yield {**a, "bias": False}
    if isinstance(a.get("out"), int) and a["out"] > 4 and a.get("mode") != "grouped":
        yield {**a, "out": max(4, a["out"] // 2)}
    if a.get("k", 1) > 1 and st.op == "conv":
        yield {**a, "k": 1}


def _candidates(spec: NetSpec) -> Iterator[NetSpec]:
    for i in reversed(range(len(spec.steps))):
        for via in range(len(spec.steps[i].ins)):
            yield _without(spec, i, via)
    for k in range(len(spec.outputs)):
        if len(spec.outputs) > 1:
            yield dataclasses.replace(spec, outputs=spec.outputs[:k] + spec.outputs[k + 1 :])
    for i, st in enumerate(spec.steps):
        for attrs in _simpler_attrs(st):
            yield dataclasses.replace(spec, steps=spec.steps[:i] + (dataclasses.replace(st, attrs=attrs),)
                                      + spec.steps[i + 1 :])
    read = {v for st in spec.steps for v in st.ins} | set(spec.outputs)
    for j in range(len(spec.inputs)):
        if f"x{j}" not in read and len(spec.inputs) > 1:
            yield _without_input(spec, j)
    for j, (n, c, h, w) in enumerate(spec.inputs):
        if (h, w) != (8, 8) or c > 3:
            yield dataclasses.replace(spec, inputs=spec.inputs[:j] + ((n, 3, 8, 8),) + spec.inputs[j + 1 :])


def shrink(spec: NetSpec, still_fails: Callable[[NetSpec], bool], budget_s: float = 300.0) -> NetSpec:
    """Greedily remove steps and outputs (and simplify settings) while ``still_fails`` holds.

    Each accepted candidate restarts the search, so the result is 1-minimal with respect to the moves tried.
    """
    deadline = time.monotonic() + budget_s
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        for cand in _candidates(spec):
            if time.monotonic() >= deadline:
                break
            if still_fails(cand):
                spec, progress = cand, True
                break
    return spec


def shrink_case(
    seed: int, *, max_nodes: int = 12, onnx_every: int = 20, budget_s: float = 300.0
) -> tuple[NetSpec, Run, str]:
    """Shrink failing case ``seed``: the minimal spec, the run that fails and its error (``describe``).

    Raises:
        ValueError: when case ``seed`` does not fail.
    """
    spec = random_spec(seed, max_nodes=max_nodes)
    for run in case_runs(seed, onnx_every):
        sig = failure_of(spec, run)
        if sig is not None:
            small = shrink(spec, lambda s, run=run, sig=sig: failure_of(s, run) == sig, budget_s)
            return small, run, describe(error_of(small, run) or RuntimeError("no longer fails"))
    raise ValueError(f"fuzz case {seed} does not fail")


_TEMPLATE = '''"""Fuzz regression: seed {seed}, shrunk to {n} ops. {importance} plan at ratio {ratio}.

{error}

Found by the fxprune fuzzer (benchmarks/fuzz.py) on {date} and shrunk by ``fxprune.testing.fuzz.shrink``.
Strict xfail until fxprune is fixed: then this test passes, pytest reports XPASS(strict) as a failure,
and the mark must be removed.
"""

from __future__ import annotations

{imports}


{source}

@pytest.mark.xfail(strict=True,{raises} reason={reason!r})
def test_fuzz_seed_{seed}({fixture}) -> None:
    model = instantiate(Net, {seed})
    inputs = make_inputs({inputs!r}, {seed})
    check_case(model, inputs, {ratio}, {scorer}{onnx})
'''


def regression_source(spec: NetSpec, run: Run, error: str, date: str) -> str:
    """The text of a pytest file that reproduces a shrunk failure as a strict xfail."""
    source = to_source(spec)
    kind = error.split(":")[0]
    third = ["import pytest", "import torch", "import torch.nn as nn"]
    if "F." in source:
        third.append("import torch.nn.functional as F")
    first = ["from fxprune.testing import instantiate, make_inputs", "from fxprune.testing.fuzz import check_case"]
    if run.importance == "random":
        first.insert(0, "from fxprune.passes.importance import random_importance")
    raises = ""
    if hasattr(fxprune, kind):
        first.insert(0, "import fxprune")
        raises = f" raises=fxprune.{kind},"
    elif kind == "FuzzCheckError":
        first[-1] = "from fxprune.testing.fuzz import FuzzCheckError, check_case"
        raises = f" raises={kind},"
    elif isinstance(getattr(builtins, kind, None), type) and issubclass(getattr(builtins, kind), BaseException):
        raises = f" raises={kind},"
    scorer = f"random_importance({spec.seed})" if run.importance == "random" else '"l2"'
    onnx = ', onnx_path=str(tmp_path / "m.onnx")' if run.onnx else ""
    onnx += ", dynamic_batch=False" if spec.literal_batch else ""
    onnx += ", reconstruct=True" if run.reconstruct else ""  # the run's options, as the case ran them
    onnx += f", heads={run.heads!r}" if run.heads else ""
    return _TEMPLATE.format(
        seed=spec.seed, n=len(spec.steps), importance=run.importance, ratio=run.ratio, error=error, date=date,
        imports="\n".join(third) + "\n\n" + "\n".join(first), source=source, raises=raises,
        reason=error[:200], fixture="tmp_path: Path" if run.onnx else "", inputs=spec.inputs, scorer=scorer,
        onnx=onnx,
    ).replace("from __future__ import annotations\n\n", "from __future__ import annotations\n\n"
              + ("from pathlib import Path\n\n" if run.onnx else ""), 1)


def write_regression(spec: NetSpec, run: Run, error: str, directory: str | Path, date: str) -> Path:
    """Write ``test_fuzz_seed_<seed>.py`` into ``directory`` and return its path."""
    path = Path(directory) / f"test_fuzz_seed_{spec.seed}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(regression_source(spec, run, error, date))
    return path
