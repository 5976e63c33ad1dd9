"""``fxprune compile`` and ``fxprune analyze`` (``bench`` is in ``bench.py``). Each takes the parsed arguments,
prints its results and returns the exit status."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxprune
from fxprune.cli.common import (
    EXIT_STRICT,
    Inputs,
    check_inputs_exist,
    check_ratio,
    deploy_heads,
    int8_feeds,
    is_ultralytics,
    load_inputs,
    progress,
    prune_with_args,
    shape_text,
)
from fxprune.cli.staging import OutputStage
from fxprune.errors import ArgumentError, FxPruneError, first_line
from fxprune.metrics import compare_latency, count_macs, count_params, default_threads

__all__ = ["EXIT_STRICT", "run_analyze", "run_compile"]



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
    """Size of the original model's ONNX file (exported to a temporary folder, same options and choice)."""
    with tempfile.TemporaryDirectory(prefix="fxprune-") as tmp:
        try:
            rep = _export(model, inputs, Path(tmp) / "original.onnx", args, check=False)[0]
        except FxPruneError as e:
            print(f"fxprune: note: the original model did not export to ONNX ({first_line(e)})", file=sys.stderr)
            return None
        return rep.bytes_after_simplify


def _export(model: nn.Module, inputs: Inputs, path: Path, args: argparse.Namespace,
            check: bool = True) -> tuple[Any, str | None, str]:
    """Export the model (a float32 copy of a half-precision one). When the simplifier made the file larger
    without removing a node, export it again unsimplified and keep that smaller file.

    Returns:
        The export report, the dtype the model was cast from (None: none), and what simplification did.
    """
    from fxprune.passes.export import export_onnx, float32_copy

    model, feed, cast = float32_copy(model, inputs)
    options = {"opset": args.opset, "dynamic_batch": not args.static_batch, "check": check}
    with deploy_heads(model) if is_ultralytics(args) else contextlib.nullcontext():
        export = export_onnx(model, feed, path, simplify=False if args.no_simplify else args.simplifier, **options)
        before, after = export.bytes_before_simplify, export.bytes_after_simplify
        if not export.simplified:
            return export, cast, "not simplified"
        if after <= before:
            return export, cast, f"{args.simplifier}"
        if export.nodes_after_simplify < export.nodes_before_simplify:
            return export, cast, f"{args.simplifier}: {after - before:,} bytes larger, kept for its fewer nodes"
        export = export_onnx(model, feed, path, simplify=False, **options)
    return export, cast, f"{args.simplifier} made it larger, {after:,} bytes: kept the unsimplified file"


def _environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    return {"fxprune": fxprune.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": threads}


def run_compile(args: argparse.Namespace) -> int:
    """``fxprune compile``: prune, export, quantise, report; all outputs appear together or not at all."""
    from fxprune.quantize import quantize_onnx
    from fxprune.report import build_report, layer_channels, write_report

    if str(args.model).startswith("hf:") and args.save_pretrained and not args.in_memory:
        from fxprune.cli.stream import run_stream, stream_blockers

        blockers = stream_blockers(args)
        if not blockers and _has_safetensors(str(args.model)[3:]):
            return run_stream(args)
        if blockers:
            print(f"note: {', '.join(blockers)} need the whole model: it is loaded into memory (not streamed)")
    check_ratio(args)
    check_inputs_exist(args)
    if args.quantize and not args.onnx:
        raise ArgumentError("--quantize needs --onnx (the int8 model is made from the exported ONNX file)")
    qpath = args.quantized_onnx
    if args.quantize and not qpath:
        qpath = str(Path(args.onnx).with_suffix("")) + ".int8.onnx"
    threads = args.threads or default_threads()
    with OutputStage() as stage:
        for flag, target in (("--onnx", args.onnx), ("--quantized-onnx", qpath), ("--report", args.report),
                             ("--save", args.save), ("--save-plan", args.save_plan)):
            if target:
                stage.check(target, flag)
        if args.save_pretrained:
            stage.check_folder(args.save_pretrained, "--save-pretrained")
        steps = 4 + bool(args.onnx) + bool(args.quantize) + bool(args.report)
        with progress(steps) as bar:
            bar.step("loading model")
            loaded, inputs = load_inputs(args)
            bar.step("pruning")
            result = prune_with_args(loaded.model, inputs, args, verify=not args.no_verify)
            if args.strict and result.unhonoured:  # nothing is written: the outputs would not be what was asked
                sys.stderr.write(f"fxprune compile: error: --strict: {len(result.unhonoured)} request(s) not "
                                 f"honoured, nothing written: {'; '.join(result.unhonoured)}\n")
                return EXIT_STRICT
            pruned = result.model.eval()
            bar.step("measuring")
            before, after = _costs(loaded.model, pruned, inputs, args)
            export = quant = cast = verdict = None
            if args.onnx:
                bar.step("exporting ONNX")
                export, cast, verdict = _export(pruned, inputs, stage.path(args.onnx), args)
                after["onnx_bytes"] = export.bytes_after_simplify
                export = dataclasses.replace(export, path=args.onnx)
            if args.quantize:
                bar.step(f"quantising ({args.quantize})")
                quant = quantize_onnx(stage.path(args.onnx), stage.path(qpath), mode=args.quantize,
                                      feeds=int8_feeds(stage.path(args.onnx), args, inputs),
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
                _save_model(pruned, stage.path(args.save), ultralytics=is_ultralytics(args))
            if args.save_plan:
                result.plan.save(stage.path(args.save_plan))
            if args.save_pretrained:
                _save_pretrained(pruned, stage.path(args.save_pretrained))
            written = stage.commit()
            bar.done()
    _print_compile(loaded.spec, inputs, result, before, after, export, quant, args, threads, written,
                   onnx_note=verdict if export is not None else "")
    if cast:
        print(f"note: the ONNX file holds a float32 copy of the {cast} model (onnxruntime's CPU kernels lack "
              f"{cast}); the pruned PyTorch model itself stays {cast}")
    if result.unhonoured:  # already logged as warnings; --strict makes them an error
        print(f"not honoured ({len(result.unhonoured)}; --strict makes this an error): " + "; ".join(result.unhonoured))
    return 0


def _has_safetensors(folder: str) -> bool:
    """Whether a Hugging Face folder holds safetensors weights (what streaming reads); a config-only folder
    or ``.bin`` weights load whole."""
    return any(Path(folder).glob("*.safetensors"))


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


def _save_pretrained(model: nn.Module, folder: Path) -> None:
    """``save_pretrained`` the pruned Hugging Face model; its config was rewritten to describe it."""
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise FxPruneError(f"--save-pretrained: {type(model).__name__} has no save_pretrained (not a Hugging Face "
                           "model); use --save")
    save(folder)


def _print_compile(spec: str, inputs: Inputs, result: fxprune.PruneResult, before: dict[str, Any],
                   after: dict[str, Any], export: Any, quant: Any, args: argparse.Namespace, threads: int,
                   written: list[Path], *, onnx_note: str = "") -> None:
    print(f"fxprune compile {spec}: input {shape_text(x.shape for x in inputs)}, ratio {result.plan.ratio:.3g}, "
          f"{pruned_text(result)} in {result.seconds:.2f}s")
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
              f"({onnx_note or 'simplify'}), onnxruntime max abs diff {export.max_abs_diff:.1e}")
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


def pruned_text(result: fxprune.PruneResult) -> str:
    """``"3 of 7 channel groups pruned"``; for a model pruned part by part (``result.parts``) the parts are
    counted too, since the root's own plan then holds few or no groups."""
    groups = result.plan.groups
    n = sum(len(k) < g.size for g, k in zip(groups, result.plan.kept, strict=True))
    text = f"{n} of {len(groups)} channel groups pruned"
    if not result.parts:
        return text
    parts = sum(p.params_after < p.params_before for p in result.parts)
    whole = f"{text}, and " if groups else ""
    return f"{whole}{parts} of {len(result.parts)} parts pruned (piecewise)"


def _print_table(rows: list[tuple[str, Any, Any, str]]) -> None:
    print(f"{'':32s}{'before':>14s}{'after':>14s}{'after/before':>14s}")
    for name, b, a, fmt in rows:
        if b is None or a is None:
            continue
        print(f"{name:32s}{b:>14,{fmt}}{a:>14,{fmt}}{(a / b if b else float('nan')):>14.2f}")


def run_analyze(args: argparse.Namespace) -> int:
    """``fxprune analyze``: print the coupled channel groups (table or JSON)."""
    loaded, inputs = load_inputs(args)
    analysis = fxprune.analyze(loaded.model, inputs, ignore=args.ignore)
    if args.json:
        groups = [{**dataclasses.asdict(g), "prunable": g.prunable, "reason": g.reason} for g in analysis.groups]
        print(json.dumps({"model": loaded.spec, "input_shapes": [list(x.shape) for x in inputs], "groups": groups,
                          "opaque": analysis.opaque}, indent=2))
        return 0
    print(f"fxprune analyze {loaded.spec}: input {shape_text(x.shape for x in inputs)}")
    print(analysis.table())
    for name, reason in analysis.opaque.items():
        print(f"opaque submodule {name}: {reason}")
    return 0

