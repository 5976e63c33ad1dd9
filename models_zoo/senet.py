"""A small squeeze-and-excitation net with conv-gated and linear-gated SE blocks."""

from __future__ import annotations

import torch
from torch import nn

from models_zoo.common import ConvBNAct, init_weights

__all__ = ["SEConv", "SELinear", "SENet", "se_net"]


class SEConv(nn.Module):
    """SE gate via adaptive avgpool, 1x1 conv reduce, ReLU, 1x1 conv expand, sigmoid.

    Args:
        ch: Channels of the gated tensor.
        reduction: Channel reduction factor of the squeeze.
    """

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(ch, ch // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(ch // reduction, ch, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate the channels of ``x``.

        Args:
            x: Input of shape ``(N, ch, H, W)``.

        Returns:
            ``x * gate`` with the same shape.
        """
        gate = self.sigmoid(self.expand(self.relu(self.reduce(self.pool(x)))))
        return x * gate


class SELinear(nn.Module):
    """SE gate via ``x.mean((2, 3), keepdim=True)``, ``view`` and two Linear layers.

    Args:
        ch: Channels of the gated tensor.
        reduction: Channel reduction factor of the squeeze.
    """

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(ch, ch // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(ch // reduction, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate the channels of ``x``.

        Args:
            x: Input of shape ``(N, ch, H, W)``.

        Returns:
            ``x * gate`` with the same shape.
        """
        s = x.mean((2, 3), keepdim=True).view(x.size(0), -1)
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(s))))
        return x * s.view(x.size(0), -1, 1, 1)


class SENet(nn.Module):
    """Three conv stages, each followed by an SE block, and a linear classifier.

    Args:
        widths: Output channels of the three stages (strides 1, 2, 2).
        num_classes: Size of the linear head.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = ConvBNAct(3, w1, 3, act=nn.ReLU(inplace=True))
        self.se1 = SEConv(w1)
        self.stage2 = ConvBNAct(w1, w2, 3, stride=2, act=nn.ReLU(inplace=True))
        self.se2 = SELinear(w2)
        self.stage3 = ConvBNAct(w2, w3, 3, stride=2, act=nn.ReLU(inplace=True))
        self.se3 = SEConv(w3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: Images of shape ``(N, 3, H, W)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        x = self.se1(self.stage1(x))
        x = self.se2(self.stage2(x))
        x = self.se3(self.stage3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def se_net() -> nn.Module:
    """Small SE net mixing conv-based and Linear/``view``-based SE gates, 10 classes."""
    return init_weights(SENet())
