"""The three subcommands. Each takes the parsed arguments, prints its results and returns the exit status."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import fxprune
from fxprune.cli.staging import OutputStage
from fxprune.errors import FxPruneError, ShapeError, first_line
from fxprune.metrics import NOISY_SPREAD, compare_latency, count_macs, count_params, default_threads
from fxprune.model_loader import (
    DEFAULT_INPUT_SHAPE,
    LoadedModel,
    load_checkpoint,
    load_model,
    parse_shape,
    random_inputs,
)

__all__ = ["run_analyze", "run_bench", "run_compile"]

Inputs = tuple[torch.Tensor, ...]
class _Steps:
    """Progress on stderr: a tqdm bar naming the current step on a terminal; elsewhere (a log, CI) one line
    per step once the run has taken ``QUIET_S`` seconds, so a long run is never silent and a quick failure
    still prints its one error line only."""

    QUIET_S = 3.0

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, file=sys.stderr, disable=not self.tty, leave=False,
                        bar_format="{desc:<28}{bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
        self.started = False
        self.t0 = time.perf_counter()

    def step(self, name: str) -> None:
        """Finish the previous step and start ``name``."""
        if self.started:
            self.bar.update()
        self.started = True
        self.n += 1
        self.bar.set_description_str(name)
        elapsed = time.perf_counter() - self.t0
        if not self.tty and elapsed >= self.QUIET_S:
            sys.stderr.write(f"fxprune: [{self.n}/{self.total}] {name} (at {elapsed:.1f}s)\n")
            sys.stderr.flush()

    def done(self) -> None:
        """Finish the last step."""
        self.bar.update()
        elapsed = time.perf_counter() - self.t0
        if not self.tty and elapsed >= self.QUIET_S:
            sys.stderr.write(f"fxprune: done in {elapsed:.1f}s\n")


@contextmanager
def _progress(total: int) -> Iterator[_Steps]:
    steps = _Steps(total)
    try:
        yield steps
    finally:
        steps.bar.close()


def _shape_text(shapes: Any) -> str:
    return ", ".join("x".join(str(d) for d in s) for s in shapes)



def _load(args: argparse.Namespace) -> tuple[LoadedModel, Inputs]:
    """Build the model, load the checkpoint, make seeded inputs and check the model runs on them."""
    loaded = load_model(args.model, seed=args.seed, trust_pickle=args.trust_pickle)
    if args.checkpoint:
        load_checkpoint(loaded.model, args.checkpoint)
    if args.input_shape:
        shapes = tuple(parse_shape(s) for s in args.input_shape)
    else:
        shapes = loaded.input_shapes or (DEFAULT_INPUT_SHAPE,)
    inputs = random_inputs(shapes, args.seed)
    try:
        with torch.no_grad():
            loaded.model(*inputs)
    except Exception as e:
        raise ShapeError(
            f"{loaded.spec} does not run on input shape {_shape_text(shapes)} ({type(e).__name__}: {first_line(e)}); "
            "set --input-shape"
        ) from e
    return loaded, inputs


def _check_ratio(args: argparse.Namespace) -> None:
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise FxPruneError(f"--ratio must satisfy 0 <= R < 1 (the fraction of channels removed), got {args.ratio:g}")


def _prune(model: nn.Module, inputs: Inputs, args: argparse.Namespace, verify: bool) -> fxprune.PruneResult:
    """Call ``fxprune.prune`` with the policy flags that were given (the same options as the Python API)."""
    targeted = args.target_macs is not None or args.target_params is not None
    if targeted and args.ratio is not None:
        raise FxPruneError("give --ratio or a --target-macs/--target-params budget, not both (a budget searches the "
                           "ratio itself)")
    kwargs: dict[str, Any] = {"example_inputs": inputs, "ignore": args.ignore, "verify": verify,
                              "importance": _importance(args, inputs),
                              "target_macs": args.target_macs, "target_params": args.target_params,
                              "round_to": args.round_to, "global_ranking": args.global_ranking,
                              "prune_heads": args.prune_heads, "min_channels": args.min_channels,
                              "leaves": tuple(args.leaf), "ratios": _module_ratios(args.module_ratio) or None}
    if _is_ultralytics(args):  # Ultralytics' own DetectionModel, which YOLO(path) and `yolo train` load
        kwargs["output"] = "module"
    ratio = args.ratio if args.ratio is not None else 0.5
    return fxprune.prune(model, ratio, **kwargs)


def _is_ultralytics(args: argparse.Namespace) -> bool:
    return str(args.model).startswith("ultralytics:")


@contextmanager
def _deploy_heads(model: nn.Module) -> Iterator[None]:
    """Ultralytics' export switch while exporting: its Detect head returns one tensor, as `yolo export` gives."""
    switched = [m for m in model.modules() if isinstance(getattr(m, "export", None), bool)]
    for m in switched:
        m.export = True
    try:
        yield
    finally:
        for m in switched:
            m.export = False


def _module_ratios(items: list[str]) -> dict[str, float]:
    """``--module-ratio layer4=0.7`` (repeatable) as ``{"layer4": 0.7}``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise FxPruneError(f"--module-ratio takes MODULE=R, e.g. layer4=0.7, got {item!r}") from None
        if not sep or not name.strip():
            raise FxPruneError(f"--module-ratio takes MODULE=R, e.g. layer4=0.7, got {item!r}")
    return out


def _importance(args: argparse.Namespace, inputs: Inputs) -> Any:
    """The criterion ``--importance`` names; ``activation`` measures the layers' inputs on ``--data``
    batches (required); ``taylor`` scores on ``--data`` batches, else on four seeded
    batches shaped like the inputs (first-order Taylor needs gradients of a loss: the mean square of the
    outputs, which needs no labels)."""
    if args.importance.lower() == "activation":
        batches = _data(args, inputs)[:32]
        if not batches:
            raise FxPruneError("--importance activation measures real inputs: pass --data (a folder of images, a "
                               ".npy/.pt tensor file, or a text file for a language model)")
        return fxprune.Activations(batches)
    if args.importance.lower() != "taylor":
        return args.importance
    batches = _data(args, inputs)[:8] or [random_inputs(tuple(tuple(x.shape) for x in inputs), args.seed + k)
                                          for k in range(4)]
    return fxprune.Taylor([(b, None) for b in batches], loss_fn=_output_energy)


def _data(args: argparse.Namespace, inputs: Inputs) -> list[Inputs]:
    """The ``--data`` batches shaped like ``inputs`` (empty without ``--data``)."""
    if not getattr(args, "data", None):
        return []
    from fxprune.data import load_batches

    return load_batches(args.data, tuple(tuple(x.shape) for x in inputs), dtype=inputs[0].dtype)


def _feeds(onnx_path: Path, args: argparse.Namespace, inputs: Inputs) -> list[dict[str, Any]] | None:
    """int8 calibration feeds from ``--data`` (None: seeded random inputs, and the report says so)."""
    batches = _data(args, inputs)
    if not batches:
        return None
    import onnxruntime as ort

    from fxprune.passes.export import ort_session_options

    session = ort.InferenceSession(str(onnx_path), ort_session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [{name: b[0].numpy()} for b in batches[: args.calibration_samples]]


def _output_energy(out: Any, _target: Any) -> torch.Tensor:
    """A label-free loss for Taylor scores on the command line: the mean square of every float output."""
    from fxprune.outputs import tensors_of

    terms = [t.float().pow(2).mean() for t in tensors_of(out) if t.is_floating_point()]
    if not terms:
        raise FxPruneError("--importance taylor needs a model with floating-point outputs")
    return torch.stack(terms).sum()


def _costs(original: nn.Module, pruned: nn.Module, inputs: Inputs,
           args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameters, MACs and latency of both models; the latencies are measured interleaved."""
    lat: list[Any] = [None, None]
    if args.runs:
        lat = compare_latency([original, pruned], inputs, runs=args.runs, warmup=args.warmup,
                              threads=args.threads or default_threads())
    return tuple({"params": count_params(m), "macs": count_macs(m, inputs),  # type: ignore[return-value]
                  "latency_ms": r.median_ms if r else None, "latency_p10_ms": r.p10_ms if r else None,
                  "latency_p90_ms": r.p90_ms if r else None} for m, r in zip((original, pruned), lat, strict=True))


def _onnx_size(model: nn.Module, inputs: Inputs, args: argparse.Namespace) -> int | None:
    """Size of the original model's ONNX file (exported to a temporary folder, same options)."""
    from fxprune.passes.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="fxprune-") as tmp:
        try:
            rep = export_onnx(model, inputs, Path(tmp) / "original.onnx", opset=args.opset,
                              simplify=False if args.no_simplify else args.simplifier, dynamic_batch=not args.static_batch, check=False)
        except FxPruneError as e:
            print(f"fxprune: note: the original model did not export to ONNX ({first_line(e)})", file=sys.stderr)
            return None
        return rep.bytes_after_simplify


def _environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    return {"fxprune": fxprune.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": threads}


def run_compile(args: argparse.Namespace) -> int:
    """``fxprune compile``: prune, export, quantise, report; all outputs appear together or not at all."""
    from fxprune.passes.export import export_onnx
    from fxprune.quantize import quantize_onnx
    from fxprune.report import build_report, layer_channels, write_report

    _check_ratio(args)
    if args.quantize and not args.onnx:
        raise FxPruneError("--quantize needs --onnx (the int8 model is made from the exported ONNX file)")
    qpath = args.quantized_onnx
    if args.quantize and not qpath:
        qpath = str(Path(args.onnx).with_suffix("")) + ".int8.onnx"
    threads = args.threads or default_threads()
    with OutputStage() as stage:
        for flag, target in (("--onnx", args.onnx), ("--quantized-onnx", qpath), ("--report", args.report),
                             ("--save", args.save), ("--save-plan", args.save_plan)):
            if target:
                stage.check(target, flag)
        steps = 4 + bool(args.onnx) + bool(args.quantize) + bool(args.report)
        with _progress(steps) as bar:
            bar.step("loading model")
            loaded, inputs = _load(args)
            bar.step("pruning")
            result = _prune(loaded.model, inputs, args, verify=not args.no_verify)
            pruned = result.model.eval()
            bar.step("measuring")
            before, after = _costs(loaded.model, pruned, inputs, args)
            export = quant = None
            if args.onnx:
                bar.step("exporting ONNX")
                with _deploy_heads(pruned) if _is_ultralytics(args) else contextlib.nullcontext():
                    export = export_onnx(pruned, inputs, stage.path(args.onnx), opset=args.opset,
                                         simplify=False if args.no_simplify else args.simplifier,
                                         dynamic_batch=not args.static_batch)
                after["onnx_bytes"] = export.bytes_after_simplify
                export = dataclasses.replace(export, path=args.onnx)
            if args.quantize:
                bar.step(f"quantising ({args.quantize})")
                quant = quantize_onnx(stage.path(args.onnx), stage.path(qpath), mode=args.quantize,
                                      feeds=_feeds(stage.path(args.onnx), args, inputs),
                                      n_samples=args.calibration_samples, seed=args.seed,
                                      quant_format=args.quant_format, per_channel=False if args.no_per_channel else None,
                                      runs=max(args.runs, 1), threads=threads)
                quant = dataclasses.replace(quant, path=qpath)
            if args.report:
                bar.step("writing report")
                if args.onnx:
                    before["onnx_bytes"] = _onnx_size(loaded.model, inputs, args)
                options = {"ratio": round(result.plan.ratio, 4), "target_macs": args.target_macs,
                           "target_params": args.target_params, "round_to": args.round_to,
                           "global_ranking": args.global_ranking or None, "importance": args.importance,
                           "quantize": args.quantize, "checkpoint": args.checkpoint, "seed": args.seed,
                           "opset": args.opset if args.onnx else None,
                           "simplify": not args.no_simplify if args.onnx else None,
                           "dynamic_batch": not args.static_batch if args.onnx else None}
                data = build_report(
                    model=loaded.spec, input_shapes=[tuple(x.shape) for x in inputs], options=options,
                    before=before, after=after, groups=result.plan.groups, kept=result.plan.kept,
                    layers=layer_channels(loaded.model, pruned), oracle=result.oracle, onnx=export,
                    quantization=quant, latency={"runs": args.runs, "threads": threads, "device": "cpu"},
                    environment=_environment(threads),
                )
                try:  # a failing report never loses the pruned model, the ONNX or the plan
                    write_report(stage.path(args.report), data)
                except Exception as e:  # noqa: BLE001 - reported on one line, the other outputs are kept
                    sys.stderr.write(f"fxprune compile: warning: the report was not written ({type(e).__name__}: "
                                     f"{first_line(e)}); the other outputs are\n")
            bar.step("saving")
            if args.save:
                _save_model(pruned, stage.path(args.save), ultralytics=_is_ultralytics(args))
            if args.save_plan:
                result.plan.save(stage.path(args.save_plan))
            written = stage.commit()
            bar.done()
    _print_compile(loaded.spec, inputs, result, before, after, export, quant, args, threads, written)
    return 0


def _save_model(model: nn.Module, path: Path, *, ultralytics: bool = False) -> None:
    """``torch.save`` the pruned model so that ``torch.load`` can rebuild it; an Ultralytics model as an
    Ultralytics checkpoint (``{"model": DetectionModel}``), which ``YOLO(path)`` loads.

    On load torch re-traces the saved code with the recorded tracer class, called without arguments;
    fxprune's tracer takes arguments, so the plain ``torch.fx.Tracer`` is recorded instead (every
    submodule is a leaf during that re-trace, so the result is the same).
    """
    if ultralytics:
        torch.save({"model": model, "train_args": dict(getattr(model, "args", {}) or {})}, path)
        return
    if getattr(model, "_tracer_cls", None) is not None:
        model._tracer_cls = None  # type: ignore[assignment]
    torch.save(model, path)


def _print_compile(spec: str, inputs: Inputs, result: fxprune.PruneResult, before: dict[str, Any],
                   after: dict[str, Any], export: Any, quant: Any, args: argparse.Namespace, threads: int,
                   written: list[Path]) -> None:
    groups = result.plan.groups
    pruned = sum(len(k) < g.size for g, k in zip(groups, result.plan.kept, strict=True))
    print(f"fxprune compile {spec}: input {_shape_text(x.shape for x in inputs)}, ratio {result.plan.ratio:.3g}, "
          f"{pruned} of {len(groups)} channel groups pruned in {result.seconds:.2f}s")
    _print_table([("params", before["params"], after["params"], "d"), ("MACs", before["macs"], after["macs"], "d"),
                  (f"latency ms ({args.runs} runs, {threads} thr)", before["latency_ms"], after["latency_ms"], ".2f")])
    if before.get("latency_p10_ms") is not None:
        print(f"latency p10-p90 ms: {before['latency_p10_ms']:.2f}-{before['latency_p90_ms']:.2f} -> "
              f"{after['latency_p10_ms']:.2f}-{after['latency_p90_ms']:.2f} (the two models timed interleaved)")
    if result.oracle is not None:
        o = result.oracle
        verdict = "passed" if o.passed else ("not applicable: " + o.reason if not o.applicable else "FAILED")
        print(f"mask oracle: {verdict} (max |pruned - masked original| = {o.max_abs_diff:.1e})")
    if export is not None:
        print(f"ONNX {export.path}: opset {export.opset}, nodes {export.nodes_before_simplify} -> "
              f"{export.nodes_after_simplify}, bytes {export.bytes_before_simplify:,} -> {export.bytes_after_simplify:,} "
              f"(simplify), onnxruntime max abs diff {export.max_abs_diff:.1e}")
    if quant is not None:
        print(f"{quant.mode} {quant.path}: {quant.bytes_int8:,} bytes ({quant.size_ratio:.2f}x fp32), top-1 agreement "
              f"{quant.top1_agreement:.1%} on {quant.n_samples} "
              f"{'calibration batches from --data' if args.data else 'RANDOM calibration inputs (pass --data for real ones)'}"
              f" ({quant.distinct_top1_fp32} distinct "
              f"fp32 classes, SQNR {quant.sqnr_db:.1f} dB), onnxruntime latency {quant.latency_fp32_ms:.2f} -> "
              f"{quant.latency_int8_ms:.2f} ms ({quant.threads} threads)")
    if written:
        print("wrote: " + ", ".join(str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p)
                                    for p in written))


def _print_table(rows: list[tuple[str, Any, Any, str]]) -> None:
    print(f"{'':32s}{'before':>14s}{'after':>14s}{'after/before':>14s}")
    for name, b, a, fmt in rows:
        if b is None or a is None:
            continue
        print(f"{name:32s}{b:>14,{fmt}}{a:>14,{fmt}}{(a / b if b else float('nan')):>14.2f}")


def run_analyze(args: argparse.Namespace) -> int:
    """``fxprune analyze``: print the coupled channel groups (table or JSON)."""
    loaded, inputs = _load(args)
    analysis = fxprune.analyze(loaded.model, inputs, ignore=args.ignore)
    if args.json:
        groups = [{**dataclasses.asdict(g), "prunable": g.prunable, "reason": g.reason} for g in analysis.groups]
        print(json.dumps({"model": loaded.spec, "input_shapes": [list(x.shape) for x in inputs], "groups": groups,
                          "opaque": analysis.opaque}, indent=2))
        return 0
    print(f"fxprune analyze {loaded.spec}: input {_shape_text(x.shape for x in inputs)}")
    print(analysis.table())
    for name, reason in analysis.opaque.items():
        print(f"opaque submodule {name}: {reason}")
    return 0


def _thread_text(n: int) -> str:
    return "1 thread" if n == 1 else f"{n} threads"


def run_bench(args: argparse.Namespace) -> int:
    """``fxprune bench``: median CPU latency of the original and the pruned model (and optionally onnxruntime)."""
    _check_ratio(args)
    if args.runs < 1:
        raise FxPruneError("bench needs --runs >= 1")
    threads = args.threads or default_threads()
    with _progress(3 + args.onnxruntime) as bar:
        bar.step("loading model")
        loaded, inputs = _load(args)
        bar.step("pruning")
        result = _prune(loaded.model, inputs, args, verify=False)
        bar.step("timing")
        lat = compare_latency([loaded.model, result.model], inputs, runs=args.runs, warmup=args.warmup,
                              threads=threads)
        ort = _ort_bench(loaded.model, result.model, inputs, args, threads) if args.onnxruntime else None
        bar.done()
    print(f"fxprune bench {loaded.spec}: input {_shape_text(x.shape for x in inputs)}, ratio {result.plan.ratio:.3g}, "
          f"torch {torch.__version__}, CPU, {_thread_text(lat[0].threads)}, median of {args.runs} runs "
          f"after {args.warmup} warm-up, the two models interleaved")
    print(f"{'':12s}{'params':>14s}{'MACs':>16s}{'torch ms':>12s}{'p10-p90 ms':>18s}"
          + (f"{'onnxruntime ms':>16s}" if ort else ""))
    for i, (name, model) in enumerate((("original", loaded.model), ("pruned", result.model))):
        extra = f"{ort[i]:>16.3f}" if ort else ""
        band = f"{lat[i].p10_ms:.3f}-{lat[i].p90_ms:.3f}"
        print(f"{name:12s}{count_params(model):>14,d}{count_macs(model, inputs):>16,d}{lat[i].median_ms:>12.3f}"
              f"{band:>18s}{extra}")
    speed = f"speedup: torch {lat[0].median_ms / lat[1].median_ms:.2f}x"
    if max(r.spread for r in lat) > NOISY_SPREAD:
        speed += " (noisy: the p10-p90 band is wide; the machine is busy)"
    print(speed + (f", onnxruntime {ort[0] / ort[1]:.2f}x" if ort else ""))
    return 0


def _ort_bench(original: nn.Module, pruned: nn.Module, inputs: Inputs, args: argparse.Namespace, threads: int) -> list[float]:
    from fxprune.passes.export import export_onnx
    from fxprune.quantize import ort_latency

    feed = {f"input_{i}": x.numpy() for i, x in enumerate(inputs)}
    times = []
    with tempfile.TemporaryDirectory(prefix="fxprune-bench-") as tmp:
        for name, model in (("original", original), ("pruned", pruned)):
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, inputs, path, check=False)
            times.append(ort_latency(path, feed, runs=args.runs, warmup=args.warmup, threads=threads)[0])
    return times
