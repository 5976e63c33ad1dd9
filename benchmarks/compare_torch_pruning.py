"""fxprune vs Torch-Pruning, side by side in one run, at the same ratio on the same random-init models.

For every model: compile wall time (median of --repeats), params and MACs after, CPU latency after (batch 1,
median), and whether the result is correct (fxprune: mask oracle, run outside the timing; both: output shape equals the original's).
Prints a Markdown table headed with the machine and date; --json writes the raw rows.

    .venv/bin/python benchmarks/compare_torch_pruning.py [--ratio 0.5] [--models resnet18,resnet50]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
import traceback
from typing import Any

import torch
import torch.nn as nn

import fxprune
import models_zoo
from fxprune.metrics import count_macs, count_params, measure_latency
from fxprune.outputs import tensors_of

DEFAULT_MODELS = [
    "tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:densenet121", "tv:efficientnet_b0", "tv:googlenet",
    "tv:regnet_y_400mf", "zoo:yolo_block", "zoo:unet",
]


def build(spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a model from ``tv:<torchvision name>`` or ``zoo:<models_zoo name>`` with random weights."""
    kind, name = spec.split(":", 1)
    torch.manual_seed(0)
    if kind == "zoo":
        return models_zoo.get(name)
    import torchvision

    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    return model, (torch.randn(1, 3, 224, 224),)


def _out_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors_of(out)]


def run_fxprune(model: nn.Module, x: tuple[torch.Tensor, ...], ratio: float) -> tuple[nn.Module, bool]:
    return fxprune.prune(model, ratio, example_inputs=x).model, True


def fxprune_proof(model: nn.Module, x: tuple[torch.Tensor, ...], ratio: float) -> bool:
    """The mask oracle, run once outside the timed compiles (it raises when it fails)."""
    oracle = fxprune.prune(model, ratio, example_inputs=x, verify=True).oracle
    return bool(oracle is not None and (oracle.passed or not oracle.applicable))


def run_torch_pruning(model: nn.Module, x: tuple[torch.Tensor, ...], ratio: float) -> tuple[nn.Module, bool]:
    import torch_pruning as tp

    model = copy.deepcopy(model)  # Torch-Pruning prunes in place; the copy is part of a fair comparison
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels in (2, 18)]
    pruner = tp.pruner.MetaPruner(
        model, x[0] if len(x) == 1 else x, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored,
    )
    pruner.step()
    return model, True


def measure(spec: str, tool: str, ratio: float, repeats: int, runs: int) -> dict[str, Any]:
    model, x = build(spec)
    with torch.no_grad():
        ref_shapes = _out_shapes(model(*x))
    row: dict[str, Any] = {"model": spec, "tool": tool}
    fn = run_fxprune if tool == "fxprune" else run_torch_pruning
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            pruned, proven = fn(model, x, ratio)
            times.append(time.perf_counter() - t0)
        pruned.eval()
        if tool == "fxprune":
            proven = fxprune_proof(model, x, ratio)
        with torch.no_grad():
            shapes_ok = _out_shapes(pruned(*x)) == ref_shapes
        row.update(
            ok=bool(shapes_ok and proven and count_params(pruned) < count_params(model)),
            compile_s=statistics.median(times),
            params_ratio=count_params(pruned) / count_params(model),
            macs_ratio=count_macs(pruned, x) / count_macs(model, x),
            latency_before_ms=measure_latency(model, x, runs=runs).median_ms,
            latency_after_ms=measure_latency(pruned, x, runs=runs).median_ms,
        )
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:120]}")
        traceback.print_exc(limit=2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="compile repeats (median)")
    parser.add_argument("--runs", type=int, default=20, help="latency runs (median)")
    parser.add_argument("--json", default="", help="write raw rows to this file")
    args = parser.parse_args()
    rows = []
    for spec in args.models.split(","):
        for tool in ("fxprune", "torch-pruning"):
            rows.append(measure(spec, tool, args.ratio, args.repeats, args.runs))
            print(json.dumps(rows[-1]), flush=True)
    import torch_pruning as tp

    print(f"\n# fxprune {fxprune.__version__} vs Torch-Pruning {tp.__version__}, ratio {args.ratio}")
    print(f"{datetime.date.today()} | {platform.machine()} {os.cpu_count()} cores | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | compile median of {args.repeats}, latency median of {args.runs}\n")
    print("| model | tool | ok | compile s | params after | MACs after | latency before ms | latency after ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['tool']} | error: {r['error']} | | | | | | |")
            continue
        print(f"| {r['model']} | {r['tool']} | {'yes' if r['ok'] else 'NO'} | {r['compile_s']:.2f} | "
              f"{r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | {r['latency_before_ms']:.1f} | "
              f"{r['latency_after_ms']:.1f} | {r['latency_before_ms'] / r['latency_after_ms']:.2f}x |")
    pairs = {}
    for r in rows:
        pairs.setdefault(r["model"], {})[r["tool"]] = r
    ratios = [p["torch-pruning"]["compile_s"] / p["fxprune"]["compile_s"] for p in pairs.values()
              if "compile_s" in p.get("fxprune", {}) and "compile_s" in p.get("torch-pruning", {})]
    if ratios:
        print(f"\nmedian compile-time ratio Torch-Pruning / fxprune: {statistics.median(ratios):.2f}x over {len(ratios)} models")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
