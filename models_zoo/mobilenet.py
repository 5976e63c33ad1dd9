"""A small MobileNetV2 with inverted residuals and depthwise convolutions."""

from __future__ import annotations

import torch
from torch import nn

from models_zoo.common import ConvBNAct, init_weights

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped at ratio 1), depthwise 3x3, 1x1 project.

    The residual add is used only when the stride is 1 and the width is unchanged.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        stride: Stride of the depthwise conv.
        expand_ratio: Hidden width multiplier.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_res = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1, act=nn.ReLU6(inplace=True)))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6(inplace=True)),
            ConvBNAct(hidden, out_ch, 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(N, in_ch, H, W)``.

        Returns:
            Output of shape ``(N, out_ch, H / stride, W / stride)``.
        """
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs.

    Args:
        num_classes: Size of the linear head.
        config: One ``(expand_ratio, out_ch, num_blocks, stride)`` tuple per stage.
        stem_ch: Stem width.
        last_ch: Width of the final 1x1 conv.
    """

    def __init__(
        self,
        num_classes: int = 10,
        config: list[tuple[int, int, int, int]] | None = None,
        stem_ch: int = 16,
        last_ch: int = 128,
    ) -> None:
        super().__init__()
        cfg = config or [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)]
        layers: list[nn.Module] = [ConvBNAct(3, stem_ch, 3, act=nn.ReLU6(inplace=True))]
        in_ch = stem_ch
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(ConvBNAct(in_ch, last_ch, 1, act=nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images of shape ``(N, 3, H, W)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2() -> nn.Module:
    """Small MobileNetV2 (expand ratios 1 and 6, depthwise 3x3, ReLU6), 10 classes."""
    return init_weights(MobileNetV2())
