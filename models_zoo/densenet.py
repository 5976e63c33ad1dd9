"""A small DenseNet: dense blocks concatenating growing feature maps."""

from __future__ import annotations

import torch
from torch import nn

from models_zoo.common import init_weights

__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "Transition", "densenet"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv producing ``growth`` maps.

    Args:
        in_ch: Channels of the concatenated input.
        growth: Channels produced by this layer.
        bn_size: Bottleneck width multiplier (``bn_size * growth`` channels).
    """

    def __init__(self, in_ch: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        mid = bn_size * growth
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Compute new feature maps from all previous ones.

        Args:
            features: Feature maps produced so far in the block.

        Returns:
            ``growth`` new channels.
        """
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    """A stack of :class:`DenseLayer` whose outputs are all concatenated.

    Args:
        in_ch: Input channels.
        num_layers: Number of dense layers.
        growth: Channels added per layer.
    """

    def __init__(self, in_ch: int, num_layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * growth, growth) for i in range(num_layers))
        self.out_ch = in_ch + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(N, in_ch, H, W)``.

        Returns:
            Output of shape ``(N, in_ch + num_layers * growth, H, W)``.
        """
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 conv and 2x2 average pool between dense blocks.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class DenseNet(nn.Module):
    """Two dense blocks joined by a transition, with a linear classifier.

    Args:
        growth: Growth rate of every dense layer.
        block_layers: Number of layers in each of the two dense blocks.
        stem_ch: Channels of the stem conv.
        num_classes: Size of the linear head.
    """

    def __init__(
        self,
        growth: int = 8,
        block_layers: tuple[int, int] = (3, 3),
        stem_ch: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem_ch, 3, padding=1, bias=False)
        self.block1 = DenseBlock(stem_ch, block_layers[0], growth)
        trans_ch = self.block1.out_ch // 2
        self.trans1 = Transition(self.block1.out_ch, trans_ch)
        self.block2 = DenseBlock(trans_ch, block_layers[1], growth)
        self.norm = nn.BatchNorm2d(self.block2.out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.block2.out_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images of shape ``(N, 3, H, W)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        x = self.block2(self.trans1(self.block1(self.stem(x))))
        x = self.pool(self.relu(self.norm(x)))
        return self.classifier(torch.flatten(x, 1))


def densenet() -> nn.Module:
    """Small DenseNet (growth 8, two 3-layer dense blocks), 10 classes."""
    return init_weights(DenseNet())
