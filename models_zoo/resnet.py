"""ResNet-family models: BasicBlock/Bottleneck ResNets, ResNet-18 and ResNeXt.

All nets share one :class:`ResNet` skeleton (stem, residual stages, adaptive
average pool, ``torch.flatten(x, 1)``, linear head). Downsampling shortcuts are
a 1x1 conv + BatchNorm whenever the stride or the width changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models_zoo.common import init_weights

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet_basic",
    "resnet_bottleneck",
    "resnext",
]


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """Build the projection shortcut, or ``None`` when identity suffices.

    Args:
        in_ch: Block input channels.
        out_ch: Block output channels.
        stride: Block stride.

    Returns:
        A 1x1 conv + BatchNorm projection, or ``None``.
    """
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers with a residual add (ResNet-18/34 block).

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the first conv (and of the shortcut).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(N, in_ch, H, W)``.

        Returns:
            Output of shape ``(N, out_ch, H / stride, W / stride)``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (optionally grouped), 1x1 expand, with a residual add.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the 3x3 conv (and of the shortcut).
        mid_ch: Width of the 3x3 conv; defaults to ``out_ch // 4`` (expansion 4).
        groups: Groups of the 3x3 conv (ResNeXt cardinality).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        mid_ch: int | None = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        mid = out_ch // 4 if mid_ch is None else mid_ch
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(N, in_ch, H, W)``.

        Returns:
            Output of shape ``(N, out_ch, H / stride, W / stride)``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BlockFactory = Callable[[int, int, int], nn.Module]


def _init_resnet(model: nn.Module) -> nn.Module:
    """Seeded init, with small scales on the last BatchNorm of each residual branch.

    Scaling the branch output to ``[0.2, 0.5]`` keeps the residual stream O(1)
    despite random (non-normalising) BatchNorm running statistics.

    Args:
        model: The ResNet to initialise in place.

    Returns:
        The same model, for chaining.
    """
    init_weights(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BasicBlock):
                m.bn2.weight.uniform_(0.2, 0.5)
            elif isinstance(m, Bottleneck):
                m.bn3.weight.uniform_(0.2, 0.5)
    return model


class ResNet(nn.Module):
    """Generic ResNet skeleton.

    Args:
        block: Factory ``(in_ch, out_ch, stride) -> module`` for one residual block.
        stem_ch: Channels produced by the stem.
        stages: One ``(out_ch, num_blocks, stride)`` tuple per stage.
        num_classes: Size of the linear head.
        large_stem: ImageNet stem (7x7/2 conv + 3x3/2 maxpool) if True, otherwise
            a 3x3/1 conv followed by the same 3x3/2 maxpool.
    """

    def __init__(
        self,
        block: BlockFactory,
        stem_ch: int,
        stages: list[tuple[int, int, int]],
        num_classes: int = 10,
        large_stem: bool = False,
    ) -> None:
        super().__init__()
        k, s = (7, 2) if large_stem else (3, 1)
        self.conv1 = nn.Conv2d(3, stem_ch, k, stride=s, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = stem_ch
        layers: list[nn.Module] = []
        for out_ch, num_blocks, stride in stages:
            blocks = [block(in_ch, out_ch, stride)]
            blocks += [block(out_ch, out_ch, 1) for _ in range(num_blocks - 1)]
            layers.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layers = nn.ModuleList(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images of shape ``(N, 3, H, W)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in self.layers:
            x = layer(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_basic() -> nn.Module:
    """Small BasicBlock ResNet: widths 16/32, two blocks per stage, 10 classes."""
    return _init_resnet(ResNet(BasicBlock, 16, [(16, 2, 1), (32, 2, 2)]))


def resnet_bottleneck() -> nn.Module:
    """Small Bottleneck ResNet (expansion 4): outputs 64/128, two blocks per stage."""
    return _init_resnet(ResNet(Bottleneck, 16, [(64, 2, 1), (128, 2, 2)]))


def resnet18() -> nn.Module:
    """Faithful ResNet-18 layout: 64-128-256-512 BasicBlocks, 1000 classes, 224x224 input."""
    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return _init_resnet(ResNet(BasicBlock, 64, stages, num_classes=1000, large_stem=True))


def _resnext_block(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """ResNeXt block: grouped 3x3 with 4 groups of width 8.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Block stride.

    Returns:
        A :class:`Bottleneck` with ``mid_ch=32`` and ``groups=4``.
    """
    return Bottleneck(in_ch, out_ch, stride, mid_ch=32, groups=4)


def resnext() -> nn.Module:
    """Small ResNeXt: grouped-conv bottlenecks (cardinality 4, group width 8), outputs 64/128."""
    return _init_resnet(ResNet(_resnext_block, 32, [(64, 2, 1), (128, 2, 2)]))
