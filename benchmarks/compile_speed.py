"""Compile time and peak memory of fxprune beside Torch-Pruning, and how they scale with graph size.

Each (model, tool) runs in its own subprocess (peak RSS is per process). Models: resnet50, densenet121,
Llama-style transformer stacks at several depths (hidden 512), and conv chains of N layers. Prints a
Markdown table and the fitted exponent of compile time vs graph size (1.0 = linear).

    .venv/bin/python benchmarks/compile_speed.py [--chains 100,1000,10000] [--depths 4,16,32] [--tp]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class Chain(nn.Module):
    """N conv-bn-relu layers of 16 channels on 8x8 maps: a graph of about 3N nodes."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                                      for _ in range(n)])
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.layers(x))


class LlamaBlock(nn.Module):
    """RMSNorm-free Llama-style block: grouped-query attention with sdpa and a SwiGLU MLP."""

    def __init__(self, d: int = 512, heads: int = 8, kv: int = 4) -> None:
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.q, self.k = nn.Linear(d, d, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.v, self.o = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.hd).transpose(1, 2)
        r = self.h // self.kv
        k = k[:, :, None].expand(b, self.kv, r, n, self.hd).reshape(b, self.h, n, self.hd)
        v = v[:, :, None].expand(b, self.kv, r, n, self.hd).reshape(b, self.h, n, self.hd)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, self.h * self.hd)
        x = x + self.o(a)
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class Llama(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 512)
        self.blocks = nn.Sequential(*[LlamaBlock() for _ in range(depth)])
        self.head = nn.Linear(512, 1000, bias=False)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)))


def build(spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    kind, arg = spec.split(":")
    torch.manual_seed(0)
    if kind == "chain":
        return Chain(int(arg)).eval(), (torch.randn(1, 16, 8, 8),)
    if kind == "llama":
        return Llama(int(arg)).eval(), (torch.randint(0, 1000, (1, 32)),)
    import torchvision

    return torchvision.models.get_model(arg, weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def _once(model: nn.Module, x: tuple[torch.Tensor, ...], tool: str) -> float:
    """One compile of ``model`` (never modified by fxprune; Torch-Pruning prunes in place, so it gets a copy)."""
    if tool == "fxprune":
        import fxprune

        r = fxprune.prune(model, 0.5, example_inputs=x)
        return r.params_after / r.params_before
    import torch_pruning as tp

    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    ignored += [model.head] if hasattr(model, "head") else []
    ignored += [model.embed] if hasattr(model, "embed") else []
    p0 = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(model, x[0], importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=ignored)
    pruner.step()
    return sum(p.numel() for p in model.parameters()) / p0


def child(spec: str, tool: str, repeats: int) -> dict[str, Any]:
    """Time the first compile in a fresh process (the tool already imported), then ``repeats - 1`` more."""
    torch.set_num_threads(2)
    model, x = build(spec)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes) if tool == "fxprune" else None
    __import__("fxprune" if tool == "fxprune" else "torch_pruning")  # import time is not compile time
    times, left = [], 0.0
    for _ in range(repeats):
        work = model if tool == "fxprune" else copy.deepcopy(model)
        t0 = time.perf_counter()
        left = _once(work, x, tool)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": spec, "tool": tool, "first_s": times[0], "median_s": statistics.median(times),
            "repeats": repeats, "peak_rss_mb": peak, "nodes": nodes, "params_left": left}


def run(spec: str, tool: str, timeout: int, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", spec, "--tool", tool, "--repeats", str(repeats)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": spec, "tool": tool, "error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"model": spec, "tool": tool, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", default="100,1000,10000")
    parser.add_argument("--depths", default="4,16,32")
    parser.add_argument("--models", default="resnet50,densenet121")
    parser.add_argument("--tp", action="store_true", help="also run Torch-Pruning on every model")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--repeats", type=int, default=5, help="compiles per process (the median is reported)")
    parser.add_argument("--big-repeats", type=int, default=1, help="compiles per process for graphs of >2,000 nodes")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="fxprune", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tool, args.repeats)))
        return
    specs = [f"tv:{m}" for m in args.models.split(",") if m] + [f"llama:{d}" for d in args.depths.split(",") if d]
    specs += [f"chain:{n}" for n in args.chains.split(",") if n]
    rows = []
    for spec in specs:
        for tool in ["fxprune"] + (["torch-pruning"] if args.tp else []):
            big = spec.startswith("chain:") and int(spec.split(":")[1]) > 600
            rows.append(run(spec, tool, args.timeout, args.big_repeats if big else args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{datetime.date.today()} | {platform.machine()} {os.cpu_count()} cores | torch {torch.__version__} | "
          "2 threads, one subprocess per model and tool, ratio 0.5; first = the first compile after import, "
          "median over --repeats compiles\n")
    print("| model | graph nodes | fxprune first / median s | fxprune peak MB | TP first / median s | TP peak MB | "
          "TP / fxprune (medians) | params left fxprune / TP |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        fx_row = next(r for r in rows if r["model"] == spec and r["tool"] == "fxprune")
        tp_row = next((r for r in rows if r["model"] == spec and r["tool"] == "torch-pruning"), None)
        cells = [spec, str(fx_row.get("nodes") or "")]
        for r in (fx_row, tp_row):
            if r is None:
                cells += ["", ""]
            elif "error" in r:
                cells += [r["error"], ""]
            else:
                cells += [f"{r['first_s']:.2f} / {r['median_s']:.2f}", f"{r['peak_rss_mb']:.0f}"]
        ok = tp_row is not None and "error" not in tp_row and "error" not in fx_row
        cells.append(f"{tp_row['median_s'] / fx_row['median_s']:.2f}x" if ok else "")
        lefts = [f"{r['params_left']:.3f}" if r and "error" not in r else "-" for r in (fx_row, tp_row)]
        cells.append(" / ".join(lefts))
        print("| " + " | ".join(cells) + " |")
    for kind in ("chain", "llama"):
        pts = [(r["nodes"], r["median_s"]) for r in rows
               if r["model"].startswith(kind) and r["tool"] == "fxprune" and "error" not in r]
        if len(pts) >= 2:
            xs, ys = [math.log(n) for n, _ in pts], [math.log(s) for _, s in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
            print(f"\nfxprune compile time ~ nodes^{slope:.2f} over the {kind} models")


if __name__ == "__main__":
    main()
