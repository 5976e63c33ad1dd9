"""Recovery on real data: train a small CNN on scikit-learn's digits, prune it, and fine-tune it back.

1. Train a conv-bn-relu CNN (32-64-128 channels) from scratch on the 8x8 digits (``--size`` upsamples).
2. Prune 50% of the channels with ``fxprune.prune``; measure accuracy right after the cut, after
   re-estimating BatchNorm statistics, and with the kept weights refitted on 256 images (no training).
3. Fine-tune two copies with the same budget: plain cross-entropy, and distillation from the unpruned model.
4. Prune to 70%: one cut vs three cuts (``fxprune.recovery.iterative``), same total fine-tuning epochs.

Prints a Markdown table (machine, date, torch version) and writes ``recover_digits.png`` and
``recover_digits.json`` to ``--out``. About a minute on 2 CPU cores; seeds are fixed.

    .venv/bin/python examples/recover_digits.py --out out
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import logging
import os
import platform
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.metrics import count_macs, count_params, measure_latency
from fxprune.recovery import EpochMetrics, finetune, iterative, recalibrate_batchnorm


class DigitsCNN(nn.Module):
    """Three conv-bn-relu stages (32-64-128 channels), global average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        a, b, c = widths
        self.features = nn.Sequential(
            block(1, a), block(a, a), nn.MaxPool2d(2),  # 8x8 -> 4x4 at the default size
            block(a, b), block(b, b), nn.MaxPool2d(2),  # 4x4 -> 2x2
            block(b, c),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def load_data(seed: int, size: int) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], resized to ``size`` x ``size`` if not 8, standardised; stratified 80/20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=seed)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return TensorDataset(x[train_idx], y[train_idx]), x[test_idx], y[test_idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 test accuracy in percent (``finetune`` and ``iterative`` call it in eval mode, no grad)."""
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="folder for the PNG plot and JSON results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=8, help="image side; 8 is the original, larger upsamples")
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--ft-epochs", type=int, default=5, help="fine-tuning epochs after the 50%% cut")
    parser.add_argument("--iter-epochs", type=int, default=9, help="total fine-tuning epochs for the 70%% runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    train_set, x_test, y_test = load_data(args.seed, args.size)
    acc = functools.partial(accuracy, x=x_test, y=y_test)

    def loader() -> DataLoader:
        # A fresh generator per run: every fine-tuning variant sees the same batches in the same order.
        return DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))

    def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)

    # 1. The unpruned model, trained from scratch with the same loop (cross-entropy, cosine schedule).
    model = DigitsCNN()
    train_hist = finetune(model, loader(), epochs=args.train_epochs, lr=0.05, optimizer=sgd(model, 0.05),
                          eval_fn=acc, progress=args.progress)
    model.eval()
    base_acc = acc(model)

    # 2. One cut at 50%; verify=True proves the pruned model equals the masked original.
    example = (x_test[:1],)
    result = fxprune.prune(model, 0.5, example_inputs=example, verify=True)
    cut_acc = acc(result.model.eval())
    # The cheapest recovery: re-estimate BatchNorm statistics on 10 training batches, no gradient step.
    recal = copy.deepcopy(result.model)
    recalibrate_batchnorm(recal, loader(), batches=10)
    recal_acc = acc(recal.eval())
    # No training either: the same channels, the kept weights refitted by least squares on 256 training images
    # (reconstruct=True; the oracle proves the refitted model, removed channels zeroed, equals the pruned one).
    images = train_set.tensors[0][:256]
    calibration = [images[i:i + 64] for i in range(0, len(images), 64)]
    refit = fxprune.prune(model, 0.5, example_inputs=example, verify=True, calibration=calibration,
                          reconstruct=True)
    refit_acc = acc(refit.model.eval())

    # 3. Same budget, two losses. A teacher makes the student match the unpruned model's soft outputs.
    ft_lr = 0.01
    runs: dict[str, list[EpochMetrics]] = {}
    students: dict[str, nn.Module] = {}
    for name, teacher in (("plain", None), ("kd", model)):
        student = copy.deepcopy(result.model)
        runs[name] = finetune(student, loader(), teacher=teacher, epochs=args.ft_epochs, lr=ft_lr,
                              optimizer=sgd(student, ft_lr), alpha=0.5, temperature=4.0, eval_fn=acc,
                              progress=args.progress)
        students[name] = student.eval()

    # 4. 70%: one cut vs three, the same total epochs of KD fine-tuning, the same loss and learning rate.
    curves: dict[str, list[float]] = {"one-shot": [], "iterative": []}

    def kd_finetune(student: nn.Module, epochs: int, curve: list[float]) -> None:
        hist = finetune(student, loader(), teacher=model, epochs=epochs, lr=ft_lr, optimizer=sgd(student, ft_lr),
                        eval_fn=acc, progress=args.progress)
        curve.extend(h.metric for h in hist if h.metric is not None)

    one_shot = iterative(model, example, target_ratio=0.7, steps=1, eval_fn=acc,
                         finetune_fn=lambda s: kd_finetune(s, args.iter_epochs, curves["one-shot"]))
    steps = 3
    three = iterative(model, example, target_ratio=0.7, steps=steps, eval_fn=acc,
                      finetune_fn=lambda s: kd_finetune(s, args.iter_epochs // steps, curves["iterative"]))

    # Costs: batch 1 (overhead-bound on CPU) and batch 256 (compute-bound).
    big = x_test[:256]
    costs = {}
    for key, m in (("unpruned", model), ("pruned 0.5", students["kd"]), ("one-shot 0.7", one_shot.model),
                   ("iterative 0.7", three.model)):
        m.eval()
        costs[key] = dict(params=count_params(m), macs=count_macs(m, example),
                          ms1=measure_latency(m, example, runs=200, warmup=20).median_ms,
                          ms256=measure_latency(m, (big,), runs=30, warmup=5).median_ms)
    seconds = time.perf_counter() - t_start

    rows = [
        (f"unpruned (trained from scratch, {args.train_epochs} ep)", "unpruned", base_acc),
        ("pruned 0.5, right after the cut", "pruned 0.5", cut_acc),
        ("pruned 0.5 + BatchNorm recalibration only (10 batches)", "pruned 0.5", recal_acc),
        ("pruned 0.5 + reconstruction only (reconstruct=True, 256 images)", "pruned 0.5", refit_acc),
        (f"pruned 0.5 + plain fine-tune ({args.ft_epochs} ep)", "pruned 0.5", runs["plain"][-1].metric),
        (f"pruned 0.5 + KD fine-tune ({args.ft_epochs} ep)", "pruned 0.5", runs["kd"][-1].metric),
        (f"pruned 0.7 one-shot + KD ({args.iter_epochs} ep)", "one-shot 0.7", one_shot.history[-1].metric),
        (f"pruned 0.7 iterative, {steps} steps + KD ({steps} x {args.iter_epochs // steps} ep)",
         "iterative 0.7", three.history[-1].metric),
    ]
    print(f"recover_digits: {datetime.date.today().isoformat()}, {machine()}, torch {torch.__version__}, "
          f"seed {args.seed}, {len(train_set)} train / {len(y_test)} test images at {args.size}x{args.size}, "
          f"total {seconds:.0f}s\n")
    print("| model | test acc % | params | MACs | latency b1 ms | latency b256 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, key, value in rows:
        c = costs[key]
        print(f"| {label} | {value:.2f} | {c['params']:,} | {c['macs']:,} | {c['ms1']:.3f} | {c['ms256']:.2f} |")
    print(f"\ngap to unpruned after KD fine-tune at 0.5: {base_acc - runs['kd'][-1].metric:+.2f} pp "
          f"(plain: {base_acc - runs['plain'][-1].metric:+.2f} pp); one test image = {100 / len(y_test):.2f} pp")
    print(f"KD loss per epoch (0.5): {', '.join(f'{h.loss:.3f}' for h in runs['kd'])}")
    for name, res in (("one-shot", one_shot), ("iterative", three)):
        steps_txt = "; ".join(f"step {h.step}: ratio {h.ratio:.3f}, {h.params:,} params, {h.metric_pruned:.2f}% after cut "
                              f"-> {h.metric:.2f}%" for h in res.history)
        print(f"{name} 0.7: {steps_txt}")

    os.makedirs(args.out, exist_ok=True)
    plot(args.out, base_acc, cut_acc, recal_acc, runs, curves, one_shot, three, args.iter_epochs // steps)
    with open(os.path.join(args.out, "recover_digits.json"), "w") as f:
        json.dump(dict(base_acc=base_acc, cut_acc=cut_acc, recal_acc=recal_acc, refit_acc=refit_acc, costs=costs,
                       seconds=seconds,
                       train=[h.metric for h in train_hist],
                       finetune={k: [h.__dict__ for h in v] for k, v in runs.items()},
                       one_shot=[h.__dict__ for h in one_shot.history],
                       iterative=[h.__dict__ for h in three.history]), f, indent=1)
    print(f"\nwrote {os.path.join(args.out, 'recover_digits.png')} and recover_digits.json")


def plot(out: str, base_acc: float, cut_acc: float, recal_acc: float, runs: dict[str, list[EpochMetrics]],
         curves: dict[str, list[float]], one_shot, three, per_step: int) -> None:  # noqa: ANN001
    """Left: accuracy per fine-tuning epoch at 0.5. Right: one-shot vs iterative at 0.7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, label in (("plain", "plain CE"), ("kd", "KD from unpruned")):
        left.plot(range(len(runs[name]) + 1), [cut_acc] + [h.metric for h in runs[name]], marker="o", label=label)
    left.plot([0], [recal_acc], marker="*", ms=12, ls="", color="black", label="BatchNorm recalibration only")
    left.axhline(base_acc, color="gray", ls="--", label=f"unpruned {base_acc:.2f}%")
    left.set(title="ratio 0.5: fine-tuning after the cut", xlabel="fine-tuning epoch", ylabel="test accuracy %")
    left.legend()
    right.plot(range(len(curves["one-shot"]) + 1), [one_shot.history[0].metric_pruned] + curves["one-shot"],
               marker="o", label="one-shot 0.7")
    xs, ys = [], []
    for i, h in enumerate(three.history):
        xs += [i * per_step] + [i * per_step + e + 1 for e in range(per_step)]
        ys += [h.metric_pruned] + curves["iterative"][i * per_step:(i + 1) * per_step]
    right.plot(xs, ys, marker="s", label=f"iterative 0.7 ({len(three.history)} steps)")
    right.axhline(base_acc, color="gray", ls="--", label="unpruned")
    right.set(title="ratio 0.7: same total fine-tuning epochs", xlabel="fine-tuning epoch", ylabel="test accuracy %")
    right.legend()
    fig.savefig(os.path.join(out, "recover_digits.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
