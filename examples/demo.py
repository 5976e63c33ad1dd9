"""The demo behind `make demo`: prune a ResNet-18 (random init) at ratio 0.5, prove it, export it, compare.

Prints a before/after table of parameters, MACs and CPU latency, and writes the simplified, onnxruntime-
checked ONNX file of the pruned model.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform

import torch

import fxprune
import models_zoo
from fxprune.metrics import count_macs, count_params, measure_latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18", help=f"a models_zoo name: {', '.join(models_zoo.names())}")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="out", help="folder for the ONNX file")
    parser.add_argument("--runs", type=int, default=20, help="latency runs (median reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, inputs = models_zoo.get(args.model)
    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, f"{args.model}_pruned.onnx")
    result = fxprune.prune(model, args.ratio, example_inputs=inputs, verify=True, onnx=onnx_path)
    small = result.model.eval()

    before = (count_params(model), count_macs(model, inputs), measure_latency(model, inputs, runs=args.runs))
    after = (count_params(small), count_macs(small, inputs), measure_latency(small, inputs, runs=args.runs))
    oracle = result.oracle
    assert oracle is not None
    print(f"fxprune demo: {args.model} at ratio {args.ratio} ({platform.machine()}, torch {torch.__version__}, "
          f"{before[2].threads} threads)")
    print(f"{'':12s}{'before':>14s}{'after':>14s}{'ratio':>8s}")
    rows = [("params", before[0], after[0]), ("MACs", before[1], after[1])]
    for name, b, a in rows:
        print(f"{name:12s}{b:>14,d}{a:>14,d}{a / b:>8.2f}")
    b_ms, a_ms = before[2].median_ms, after[2].median_ms
    print(f"{'latency ms':12s}{b_ms:>14.2f}{a_ms:>14.2f}{a_ms / b_ms:>8.2f}   (median of {args.runs}, batch 1)")
    print(f"compile {result.seconds:.2f}s; mask oracle: max |pruned - masked original| = {oracle.max_abs_diff:.1e} "
          f"({'passed' if oracle.passed else 'FAILED'})")
    print(f"ONNX (onnxsim-simplified, checked in onnxruntime): {onnx_path} ({os.path.getsize(onnx_path):,} bytes)")


if __name__ == "__main__":
    main()
