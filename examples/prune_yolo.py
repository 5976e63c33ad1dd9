"""Prune a stock Ultralytics YOLO (random init, from its packaged yaml), export ONNX, and compare.

No Ultralytics module is edited or replaced: the backbone and neck are one traced graph, the Detect head's
box/cls branches are pruned piecewise, DFL and the outputs stay. The result is Ultralytics' own
DetectionModel, saved as an Ultralytics-style checkpoint ({"model": module}).

    .venv/bin/python examples/prune_yolo.py --cfg yolov8n.yaml --ratio 0.5 --out out
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

import fxprune
from fxprune.metrics import count_macs, count_params, measure_latency
from fxprune.passes.export import export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="yolov8n.yaml", help="an Ultralytics model yaml (yolov8n.yaml, yolo11s.yaml, ...)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--out", default="out")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg=args.cfg, verbose=False).eval()
    x = (torch.randn(1, 3, args.imgsz, args.imgsz),)
    result = fxprune.prune(model, args.ratio, example_inputs=x, verify=True, output="module")
    small = result.model.eval()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.cfg.replace(".yaml", f"_pruned{args.ratio:g}"))
    torch.save({"model": small}, stem + ".pt")
    for m in small.modules():  # Ultralytics' export switch: Detect returns one tensor
        if hasattr(m, "export"):
            m.export = True
    onnx = export_onnx(small, x, stem + ".onnx")

    rows = [("params", count_params(model), count_params(small)), ("MACs", count_macs(model, x), count_macs(small, x))]
    lat = measure_latency(model, x, runs=args.runs), measure_latency(small, x, runs=args.runs)
    print(f"{args.cfg} at ratio {args.ratio}, input {args.imgsz}x{args.imgsz} ({platform.machine()}, "
          f"torch {torch.__version__}, {lat[0].threads} threads)")
    print(f"{'':12s}{'before':>16s}{'after':>16s}{'ratio':>8s}")
    for name, b, a in rows:
        print(f"{name:12s}{b:>16,d}{a:>16,d}{a / b:>8.2f}")
    print(f"{'latency ms':12s}{lat[0].median_ms:>16.1f}{lat[1].median_ms:>16.1f}{lat[1].median_ms / lat[0].median_ms:>8.2f}")
    oracle = result.oracle
    print(f"mask oracle (backbone+neck): {'passed' if oracle and oracle.passed else oracle}; head parts: "
          + ", ".join(f"{p.name} {p.oracle}" for p in result.parts if p.params_after < p.params_before))
    print(f"ONNX {stem}.onnx: nodes {onnx.nodes_before_simplify} -> {onnx.nodes_after_simplify} (onnxsim), "
          f"onnxruntime vs PyTorch max abs diff {onnx.max_abs_diff:.2e}")
    print(f"checkpoint {stem}.pt: torch.load(...)['model'] is an Ultralytics DetectionModel")


if __name__ == "__main__":
    main()
