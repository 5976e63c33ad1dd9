"""Reconstruction without training on CNNs: digits, the recovery demo's CNN and a models_zoo ResNet.

scikit-learn's bundled digits (8x8, the split of ``examples/recover_digits.py``), each model trained from scratch
for 15 epochs (SGD, cosine, ``fxprune.finetune``), then pruned at ``--ratio`` with ``verify=True``, and measured
on the held-out images right after the cut (no gradient step):

- the cut alone (l2; activation-aware on the calibration images);
- BatchNorm statistics re-estimated on the calibration images (the cheapest recovery);
- ``reconstruct=True`` on the same 256 training images (l2 and activation-aware selection);
- for the ResNet, also the first stage's residual stream alone (every other group kept), cut and refitted.

The ResNet (``models_zoo.resnet.resnet_basic``: 16/32 channels, BasicBlocks) reads the grey image as three
channels. Prints a markdown table with machine, date and commit.

    .venv/bin/python benchmarks/cnn_reconstruct.py [--seeds 0,1] [--ratio 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from recover_digits import DigitsCNN, accuracy, load_data  # noqa: E402

import fxprune  # noqa: E402
from fxprune.recovery import finetune, recalibrate_batchnorm  # noqa: E402
from models_zoo.resnet import resnet_basic  # noqa: E402


def trained(kind: str, seed: int) -> tuple[nn.Module, TensorDataset, torch.Tensor, torch.Tensor]:
    """The model trained from scratch on the digits split of ``seed``, and its data."""
    torch.manual_seed(seed)
    train_set, x_test, y_test = load_data(seed, 8)
    if kind == "resnet":  # grey as three channels
        x_test = x_test.expand(-1, 3, -1, -1).contiguous()
        train_set = TensorDataset(train_set.tensors[0].expand(-1, 3, -1, -1).contiguous(), train_set.tensors[1])
    model = DigitsCNN() if kind == "cnn" else resnet_basic()
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    finetune(model, loader, epochs=15, lr=0.05, optimizer=opt, progress=False)
    return model.eval(), train_set, x_test, y_test


def rows(kind: str, seed: int, ratio: float, images: int) -> list[list[str]]:
    """One table row per recovery of ``kind`` trained with ``seed``."""
    model, train_set, x_test, y_test = trained(kind, seed)
    acc = functools.partial(accuracy, x=x_test, y=y_test)
    calibration = [train_set.tensors[0][i:i + 64] for i in range(0, images, 64)]
    example = (x_test[:1],)
    out = [[kind, str(seed), "unpruned", f"{acc(model):.2f}", "-", "-"]]
    runs: list[tuple[str, dict]] = []
    if kind == "resnet":  # only the first stage's residual stream (the stem's channels, through every add)
        groups = fxprune.prune(model, ratio, example_inputs=example).plan.groups
        others = {g.id: 0.0 for g in groups if "conv1.weight[0]" not in g.producers}
        runs += [("stage-1 stream only, cut (activation)", {"calibration": calibration, "group_ratios": others}),
                 ("stage-1 stream only, activation + reconstruction",
                  {"calibration": calibration, "group_ratios": others, "reconstruct": True})]
    for label, kwargs in (*runs,("cut (l2)", {"importance": "l2"}),
                          ("cut (activation)", {"importance": "activation", "calibration": calibration}),
                          ("cut (l2) + BatchNorm re-estimated", {"importance": "l2", "recal": True}),
                          ("l2 + reconstruction", {"importance": "l2", "calibration": calibration,
                                                   "reconstruct": True}),
                          ("activation + reconstruction", {"calibration": calibration, "reconstruct": True})):
        recal = kwargs.pop("recal", False)
        t0 = time.perf_counter()
        r = fxprune.prune(model, ratio, example_inputs=example, verify=True, **kwargs)
        pruned = r.model
        if recal:
            pruned = copy.deepcopy(pruned)
            recalibrate_batchnorm(pruned, [(b,) for b in calibration], batches=len(calibration))
        secs = time.perf_counter() - t0
        out.append([kind, str(seed), label, f"{acc(pruned.eval()):.2f}", f"{r.params_after / r.params_before:.3f}",
                    f"{secs:.1f}"])
        print(" | ".join(out[-1]), flush=True)
        assert r.oracle is not None and r.oracle.passed, r.oracle
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--images", type=int, default=256, help="calibration images (batches of 64)")
    p.add_argument("--models", default="cnn,resnet")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    table = [row for kind in args.models.split(",") for seed in (int(s) for s in args.seeds.split(","))
             for row in rows(kind, seed, args.ratio, args.images)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    print(f"\n## Digits at ratio {args.ratio}, no training after the cut ({datetime.date.today()})\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs ({args.threads} torch threads), torch "
          f"{torch.__version__}, commit {commit.strip()}; {args.images} calibration images; total "
          f"{time.perf_counter() - start:.0f}s\n")
    print("| model | seed | recovery | test acc % | params kept | s |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
