"""``fxprune finetune-yolo``: fine-tune a pruned Ultralytics checkpoint with Ultralytics' own trainer.

``yolo train model=pruned.pt`` cannot recover a pruned model: Ultralytics' trainer rebuilds the network from
its yaml (the original widths) and copies only the weights whose shapes match. This command runs the same
trainer (data loading, augmentation, loss, validation, checkpoints) on the pruned ``DetectionModel`` itself,
so the result keeps its pruned widths; ``YOLO(path)`` loads the checkpoints it writes and ``yolo export``
exports them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxprune.errors import ArgumentError, FxPruneError

if TYPE_CHECKING:  # torch is imported when a command runs, so that `fxprune --help` stays fast
    import torch.nn as nn


def pruned_trainer(model: nn.Module) -> type:
    """An Ultralytics ``DetectionTrainer`` subclass that trains ``model`` as it is instead of rebuilding it.

    Args:
        model: a pruned Ultralytics ``DetectionModel`` (``output="module"``).

    Returns:
        The trainer class, for ``YOLO(path).train(trainer=...)``.
    """
    from ultralytics.models.yolo.detect import DetectionTrainer

    class PrunedTrainer(DetectionTrainer):
        """Ultralytics' detection trainer on the pruned model (its widths are not in any yaml)."""

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
            return model

    return PrunedTrainer


def load_detection_model(path: str | Path) -> nn.Module:
    """The ``DetectionModel`` of an Ultralytics checkpoint that fxprune wrote (``{"model": module}``).

    An Ultralytics checkpoint is a pickle: it is loaded with ``weights_only=False``, which runs code from the
    file. Only load checkpoints you made or trust.
    """
    import torch
    import torch.nn as nn

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614 - the user's own checkpoint
    except FileNotFoundError as e:
        raise FxPruneError(f"{path}: no such checkpoint") from e
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module) or not hasattr(model, "yaml"):
        raise FxPruneError(f"{path} is not an Ultralytics checkpoint with a DetectionModel under 'model' "
                           "(prune with: fxprune compile ultralytics:<cfg> --save PATH.pt)")
    return model.float()


def run_finetune_yolo(args: argparse.Namespace) -> int:
    """Train the pruned checkpoint ``args.checkpoint`` on ``args.data`` and print where the weights went."""
    data = dataset_argument(args.data)
    try:
        from ultralytics import YOLO
    except ImportError as e:
        raise FxPruneError("finetune-yolo needs Ultralytics: pip install 'fxprune[yolo]'") from e
    model = load_detection_model(args.checkpoint)
    params = sum(p.numel() for p in model.parameters())
    if Path(data).is_file():
        _check_classes(model, data)
    yolo = YOLO(str(args.checkpoint))
    yolo.train(data=data, trainer=pruned_trainer(model), epochs=args.epochs, imgsz=args.imgsz,
               batch=args.batch, device=args.device, workers=args.workers, project=str(Path(args.project).resolve()),
               name=args.name, exist_ok=True, plots=False, amp=args.device != "cpu", verbose=args.verbose)
    weights = Path(args.project).resolve() / args.name / "weights"
    best = weights / "best.pt" if (weights / "best.pt").exists() else weights / "last.pt"
    trained = sum(p.numel() for p in YOLO(str(best)).model.parameters())
    if trained != params:
        raise FxPruneError(f"the trained checkpoint has {trained} parameters, the pruned model {params}")
    print(f"fine-tuned {args.checkpoint} ({params:,} parameters) for {args.epochs} epochs: {best}")
    if args.export:
        print(f"exported: {YOLO(str(best)).export(format=args.export, imgsz=args.imgsz)}")
    return 0


def dataset_argument(data: str) -> str:
    """``--data`` as Ultralytics should get it: a local dataset yaml, or a bare dataset name such as
    ``coco8.yaml`` (no folder in it), which Ultralytics resolves itself (its bundled configs, downloading the
    images on first use).

    Raises:
        ArgumentError: a path with a folder (or a name not ending in .yaml/.yml) that is not a local file.
    """
    path = Path(data)
    if path.is_file():
        return data
    if path.is_dir():
        raise ArgumentError(f"--data {data} is a folder; give the dataset's .yaml file")
    bare = "/" not in data and "\\" not in data
    if bare and data.endswith((".yaml", ".yml")):
        return data  # Ultralytics' own dataset name (coco8.yaml, coco128.yaml, ...)
    if not bare:
        raise ArgumentError(f"--data {data}: no such dataset yaml (folder {path.parent} has no such file); give "
                            "a local dataset .yaml or an Ultralytics dataset name such as coco8.yaml")
    raise ArgumentError(f"--data {data}: no such file; give a dataset .yaml (a local file, or an Ultralytics "
                        "dataset name such as coco8.yaml)")


def _check_classes(model: nn.Module, data: str) -> None:
    """Say when the data set's classes are not the head's (training still runs: the extra ones stay unused)."""
    import torch.nn as nn
    import yaml

    names = (yaml.safe_load(Path(data).read_text()) or {}).get("names")
    layers = getattr(model, "model", None)
    head = getattr(layers[-1], "nc", None) if isinstance(layers, nn.Sequential) and len(layers) else None
    if names is not None and isinstance(head, int) and len(names) != head:
        print(f"fxprune: warning: {data} has {len(names)} classes, the pruned head {head}; prune a model built "
              f"for your classes (an Ultralytics yaml with nc: {len(names)}) to deploy it", file=sys.stderr)


def add_parser(sub: Any) -> None:
    """Register the ``finetune-yolo`` subcommand."""
    y = sub.add_parser("finetune-yolo", help="fine-tune a pruned Ultralytics checkpoint with Ultralytics' trainer",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    y.add_argument("checkpoint", metavar="CHECKPOINT.pt", help="what `fxprune compile ultralytics:... --save` wrote")
    y.add_argument("--data", required=True, metavar="DATA.yaml", help="an Ultralytics dataset yaml")
    y.add_argument("--epochs", type=int, default=10)
    y.add_argument("--imgsz", type=int, default=640)
    y.add_argument("--batch", type=int, default=16)
    y.add_argument("--device", default="cpu", help="cpu, 0, 0,1, ... (default cpu)")
    y.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    y.add_argument("--project", default="runs/fxprune", help="output folder (default runs/fxprune)")
    y.add_argument("--name", default="finetune", help="run name under --project (default finetune)")
    y.add_argument("--export", metavar="FORMAT", help="export the best weights afterwards (onnx, openvino, ...)")
    y.add_argument("-v", "--verbose", action="store_true", help="Ultralytics' own per-epoch output")
    y.add_argument("--debug", action="store_true", help="debug logging, and a full traceback on errors")
    y.add_argument("--ort-log-level", choices=["verbose", "info", "warning", "error", "fatal"], default="error",
                   help=argparse.SUPPRESS)
