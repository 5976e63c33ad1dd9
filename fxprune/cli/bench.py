"""``fxprune bench``: the latency of the original and the pruned model, timed interleaved (and in onnxruntime)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from fxprune.cli.common import (
    Inputs,
    check_inputs_exist,
    check_ratio,
    load_inputs,
    progress,
    prune_with_args,
    shape_text,
)
from fxprune.errors import FxPruneError
from fxprune.metrics import NOISY_SPREAD, compare_latency, count_macs, count_params, default_threads

__all__ = ["run_bench", "thread_text"]


def thread_text(n: int) -> str:
    return "1 thread" if n == 1 else f"{n} threads"


def run_bench(args: argparse.Namespace) -> int:
    """``fxprune bench``: median CPU latency of the original and the pruned model (and optionally onnxruntime)."""
    check_ratio(args)
    check_inputs_exist(args)
    if args.runs < 1:
        raise FxPruneError("bench needs --runs >= 1")
    threads = args.threads or default_threads()
    with progress(3 + args.onnxruntime) as bar:
        bar.step("loading model")
        loaded, inputs = load_inputs(args)
        bar.step("pruning")
        result = prune_with_args(loaded.model, inputs, args, verify=False)
        bar.step("timing")
        lat = compare_latency([loaded.model, result.model], inputs, runs=args.runs, warmup=args.warmup,
                              threads=threads)
        ort = _ort_bench(loaded.model, result.model, inputs, args, threads) if args.onnxruntime else None
        bar.done()
    print(f"fxprune bench {loaded.spec}: input {shape_text(x.shape for x in inputs)}, ratio {result.plan.ratio:.3g}, "
          f"torch {torch.__version__}, CPU, {thread_text(lat[0].threads)}, median of {args.runs} runs "
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

    feed = {f"input_{i}": (x.float() if x.is_floating_point() else x).numpy() for i, x in enumerate(inputs)}
    times = []
    with tempfile.TemporaryDirectory(prefix="fxprune-bench-") as tmp:
        for name, model in (("original", original), ("pruned", pruned)):
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, inputs, path, check=False)  # half precision: it exports a float32 copy
            times.append(ort_latency(path, feed, runs=args.runs, warmup=args.warmup, threads=threads)[0])
    return times
