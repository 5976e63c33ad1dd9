"""Uniform vs global ranking at a MAC budget on models_zoo models: allocation, params, MACs, output drift.

    .venv/bin/python benchmarks/policy_compare.py [--target-macs 0.5]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

import fxprune
import models_zoo
from fxprune.metrics import count_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--models", default="resnet_basic,resnet18,mobilenet_v2")
    args = parser.parse_args()
    print(f"# uniform vs global ranking at target_macs={args.target_macs}")
    print(f"{datetime.date.today()} | {platform.machine()} | torch {torch.__version__}\n")
    print("| model | policy | ratio found | MACs left | params left | kept channels per prunable group | output rel. drift |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, x = models_zoo.get(name)
        batch = torch.randn(8, *x[0].shape[1:], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(batch)
        for policy, glob in (("uniform", False), ("global", True)):
            r = fxprune.prune(model, example_inputs=x, target_macs=args.target_macs, global_ranking=glob, verify=True)
            kept = [f"{len(k)}/{g.size}" for g, k in zip(r.plan.groups, r.plan.kept, strict=True) if g.prunable]
            with torch.no_grad():
                drift = float((r.model(batch) - ref).norm() / ref.norm())
            macs = count_macs(r.model, x) / count_macs(model, x)
            shown = " ".join(kept[:10]) + (" ..." if len(kept) > 10 else "")
            print(f"| {name} | {policy} | {r.plan.ratio:.3f} | {macs:.3f} | {r.params_after / r.params_before:.3f} | "
                  f"{shown} | {drift:.3f} |")


if __name__ == "__main__":
    main()
