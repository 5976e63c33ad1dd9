"""A tiny two-level UNet for 2-class segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models_zoo.common import ConvBNAct, init_weights

__all__ = ["DoubleConv", "UNet", "unet"]


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            ConvBNAct(in_ch, out_ch, 3, act=nn.ReLU(inplace=True)),
            ConvBNAct(out_ch, out_ch, 3, act=nn.ReLU(inplace=True)),
        )


class UNet(nn.Module):
    """UNet with two max-pool levels and skip concatenations.

    The deep level upsamples with ``ConvTranspose2d(kernel 2, stride 2)``; the
    shallow level uses ``F.interpolate`` (nearest, x2), so both patterns appear.

    Args:
        base: Width of the first level (doubled at each level down).
        num_classes: Output channels of the final 1x1 conv.
    """

    def __init__(self, base: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        c1, c2, c3 = base, 2 * base, 4 * base
        self.enc1 = DoubleConv(3, c1)
        self.enc2 = DoubleConv(c1, c2)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c2, c3)
        self.up2 = nn.ConvTranspose2d(c3, c2, kernel_size=2, stride=2)
        self.dec2 = DoubleConv(c2 + c2, c2)
        self.dec1 = DoubleConv(c2 + c1, c1)
        self.out = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of images.

        Args:
            x: Images of shape ``(N, 3, H, W)`` with ``H`` and ``W`` divisible by 4.

        Returns:
            Per-pixel logits of shape ``(N, num_classes, H, W)``.
        """
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        up1 = F.interpolate(d2, scale_factor=2.0, mode="nearest")
        d1 = self.dec1(torch.cat([up1, e1], 1))
        return self.out(d1)


def unet() -> nn.Module:
    """Tiny UNet (widths 16/32/64), ConvTranspose2d and interpolate upsampling, 2 classes."""
    return init_weights(UNet())
