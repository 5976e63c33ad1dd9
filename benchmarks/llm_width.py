"""Width pruning of GPT-2 and BERT: the hidden size (residual stream) with heads and MLPs, against heads and MLPs only.

Issue #18's target: with hidden-size pruning on, GPT-2 (n_embd 768, 6 layers, vocabulary 50257) and BERT-base
(``BertForMaskedLM``, 12 layers) at ratio 0.5 keep at most 0.4x of their parameters and run at least 1.8x
faster (batch 1, 16 tokens, 1 thread, medians of interleaved runs: ``fxprune.metrics.compare_latency``).
Random weights (latency and counts do not depend on them); every pruned model is also saved with
``save_pretrained`` and reloaded, and must give the same logits.

    .venv/bin/python benchmarks/llm_width.py [--runs 50] [--models gpt2,bert] [--no-baseline]
    .venv/bin/python benchmarks/llm_width.py --quick   # a smoke run: few repeats, not a measurement
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from typing import Any

import torch
from torch import nn

import fxprune
from fxprune.metrics import compare_latency, count_params

TARGET_PARAMS = 0.4  # at most this fraction of the parameters left
TARGET_SPEEDUP = 1.8  # at least this much faster


def build(name: str, layers: int | None) -> tuple[nn.Module, Any]:
    """The model (random weights, seeded, eval mode) and its Auto class for reloading."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=768, n_layer=layers or 6, n_head=12, vocab_size=50257,
                                         n_positions=1024)
        return transformers.GPT2LMHeadModel(config).eval(), transformers.AutoModelForCausalLM
    if name == "bert":
        config = transformers.BertConfig(num_hidden_layers=layers or 12)  # bert-base: 768 wide, 12 heads, 3072
        return transformers.BertForMaskedLM(config).eval(), transformers.AutoModelForMaskedLM
    raise SystemExit(f"unknown model {name!r}: use gpt2 or bert")


def reloads(model: nn.Module, auto: Any, ids: torch.Tensor) -> bool:
    """Whether ``save_pretrained`` then ``from_pretrained`` gives the same logits (False when the config cannot
    describe the pruned model: GPT-2 and BERT without hidden pruning, whose attention width follows it)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        try:
            back = auto.from_pretrained(d).eval()
        except RuntimeError:  # a checkpoint whose shapes the config does not describe
            return False
        with torch.no_grad():
            return torch.equal(model(ids).logits, back(ids).logits)


def machine() -> str:
    """One line naming the machine, the libraries and the date."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}")


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prune ``name`` with and (unless ``--no-baseline``) without the hidden size; time all against the original."""
    model, auto = build(name, args.layers)
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    variants: dict[str, dict[str, Any]] = {"hidden + heads + MLP": {"hidden": args.hidden}}
    if not args.no_baseline:
        variants["heads + MLP only"] = {}
    rows: list[dict[str, Any]] = []
    pruned: list[nn.Module] = []
    for label, extra in variants.items():
        t0 = time.perf_counter()
        result = fxprune.prune(model, args.ratio, prune_heads=True, output="module", example_inputs=(ids,), **extra)
        seconds = time.perf_counter() - t0
        pruned.append(result.model)
        rows.append({"model": name, "variant": label, "params_before": count_params(model),
                     "params_after": count_params(result.model), "prune_s": round(seconds, 1),
                     "hidden_size": getattr(result.model.config, "hidden_size", None),
                     "reload_ok": reloads(result.model, auto, ids)})
    reports = compare_latency([model, *pruned], (ids,), runs=args.runs, warmup=args.warmup, threads=args.threads)
    for row, report in zip(rows, reports[1:], strict=True):
        row["fraction_params"] = round(row["params_after"] / row["params_before"], 3)
        row["ms_before"] = round(reports[0].median_ms, 2)
        row["ms_after"] = round(report.median_ms, 2)
        row["speedup"] = round(reports[0].median_ms / report.median_ms, 2)
        row["spread"] = round(max(reports[0].spread, report.spread), 2)
        met = row["fraction_params"] <= TARGET_PARAMS and row["speedup"] >= TARGET_SPEEDUP
        row["target_met"] = met if row["variant"].startswith("hidden") else "-"  # the target is for hidden
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--ratio", type=float, default=0.5, help="heads and MLP channels removed")
    parser.add_argument("--hidden", type=float, default=0.5, help="hidden channels removed")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (default: 6 / 12)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true", help="skip the heads + MLP only variant")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 runs, 1 warm-up, 2 layers")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup, args.layers = 5, 1, args.layers or 2
    print(f"# llm_width: ratio {args.ratio}, hidden {args.hidden}, prune_heads=True; batch 1, {args.tokens} tokens, "
          f"{args.threads} thread(s), medians of {args.runs} interleaved runs{' (QUICK: not a measurement)' if args.quick else ''}")
    print(f"# {machine()}")
    rows = [row for name in args.models.split(",") for row in run_model(name.strip(), args)]
    header = ("model", "variant", "hidden_size", "fraction_params", "ms_before", "ms_after", "speedup", "spread",
              "reload_ok", "target_met", "prune_s")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    print(f"# target (hidden + heads + MLP): fraction_params <= {TARGET_PARAMS} and speedup >= {TARGET_SPEEDUP}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
