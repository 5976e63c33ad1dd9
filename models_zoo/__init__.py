"""Seeded, ``torch.fx``-traceable CNN/MLP models used as the fxprune test corpus.

Example:
    >>> from models_zoo import get, names
    >>> model, inputs = get("resnet_basic", seed=0)
    >>> logits = model(*inputs)

Every model is built from random init only (no downloads), uses standard torch
ops with no data-dependent control flow, and traces with
``torch.fx.symbolic_trace``. BatchNorm layers carry non-trivial random running
statistics so that tests exercise them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models_zoo.densenet import densenet
from models_zoo.misc import flatten_linear, flatten_linear_fn, mlp
from models_zoo.mobilenet import mobilenet_v2
from models_zoo.resnet import resnet18, resnet_basic, resnet_bottleneck, resnext
from models_zoo.senet import se_net
from models_zoo.unet import unet
from models_zoo.yolo import yolo_block

__all__ = ["ZOO", "ZooEntry", "get", "names"]

_IMG32 = (1, 3, 32, 32)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        name: Registry key.
        build: Zero-argument builder drawing all weights from the global torch RNG.
        input_shape: Shape of the single example input tensor.
        description: One-line summary of the architecture.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str


_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry("resnet_basic", resnet_basic, _IMG32, "ResNet, BasicBlocks, widths 16/32, 2x2 blocks"),
    ZooEntry("resnet_bottleneck", resnet_bottleneck, _IMG32, "ResNet, Bottleneck blocks (expansion 4)"),
    ZooEntry("resnet18", resnet18, (1, 3, 224, 224), "Faithful ResNet-18 layout, 1000 classes"),
    ZooEntry("mobilenet_v2", mobilenet_v2, _IMG32, "MobileNetV2, depthwise 3x3, ReLU6, expand 1/6"),
    ZooEntry("densenet", densenet, _IMG32, "DenseNet, torch.cat dense blocks + transition"),
    ZooEntry("yolo_block", yolo_block, _IMG32, "YOLO-style C2f split/chunk, SPPF, FPN concat, 2 heads"),
    ZooEntry("se_net", se_net, _IMG32, "Conv stages with conv-SE and mean/view/Linear-SE gates"),
    ZooEntry("unet", unet, _IMG32, "Tiny UNet, ConvTranspose2d + interpolate, skip cats"),
    ZooEntry("flatten_linear", flatten_linear, _IMG32, "Convs + MaxPool2d, x.view(N, -1) into Linear"),
    ZooEntry("flatten_linear_fn", flatten_linear_fn, _IMG32, "Convs + AvgPool2d, torch.flatten into Linear"),
    ZooEntry("resnext", resnext, _IMG32, "ResNeXt, grouped 3x3 (4 groups x 8) bottlenecks"),
    ZooEntry("mlp", mlp, (1, 64), "Residual MLP 64 -> 128 -> 128 -> 10"),
)

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def names() -> list[str]:
    """List the zoo's model names.

    Returns:
        Model names in registration order.
    """
    return list(ZOO)


def get(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a zoo model and a matching example input, both fully seeded.

    Args:
        name: Zoo model name (see :func:`names`).
        seed: Seed for the weights (via ``torch.manual_seed``) and for the input.

    Returns:
        The model in ``eval()`` mode and a tuple with one example input tensor.

    Raises:
        ValueError: If ``name`` is not in the zoo.
    """
    entry = ZOO.get(name)
    if entry is None:
        raise ValueError(f"unknown zoo model {name!r}; known models: {', '.join(names())}")
    torch.manual_seed(seed)
    model = entry.build().eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(entry.input_shape, generator=gen)
    return model, (example,)
