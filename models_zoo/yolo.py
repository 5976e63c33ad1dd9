"""A tiny YOLOv8-style detector: Conv-BN-SiLU, C2f, SPPF, FPN upsample + concat.

The graph exercises tensor ``split``/``chunk`` unpacked into two names,
``torch.cat`` of split halves with bottleneck outputs, a chain of max pools
concatenated with its input, nearest-neighbour upsampling and two heads.
"""

from __future__ import annotations

import torch
from torch import nn

from models_zoo.common import ConvBNAct, init_weights

__all__ = ["SPPF", "C2f", "Conv", "YoloBottleneck", "YoloNet", "yolo_block"]


class Conv(ConvBNAct):
    """Conv2d + BatchNorm2d + SiLU (the YOLO ``Conv`` module).

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, act=nn.SiLU(inplace=True))


class YoloBottleneck(nn.Module):
    """Two 3x3 Conv modules with an optional residual add.

    Args:
        ch: Input and output channels.
        shortcut: Whether to add the input to the output.
    """

    def __init__(self, ch: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(ch, ch, 3)
        self.cv2 = Conv(ch, ch, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the bottleneck.

        Args:
            x: Input of shape ``(N, ch, H, W)``.

        Returns:
            Output of the same shape.
        """
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convs: split, run bottlenecks on one half, concat all.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        n: Number of bottlenecks.
        shortcut: Whether bottlenecks use residual adds.
        use_chunk: Split with ``chunk(2, 1)`` instead of ``split((c, c), 1)``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        n: int = 1,
        shortcut: bool = True,
        use_chunk: bool = False,
    ) -> None:
        super().__init__()
        self.c = out_ch // 2
        self.use_chunk = use_chunk
        self.cv1 = Conv(in_ch, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, out_ch, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input of shape ``(N, in_ch, H, W)``.

        Returns:
            Output of shape ``(N, out_ch, H, W)``.
        """
        if self.use_chunk:
            a, b = self.cv1(x).chunk(2, 1)
        else:
            a, b = self.cv1(x).split((self.c, self.c), 1)
        ys: list[torch.Tensor] = []
        y = b
        for m in self.m:
            y = m(y)
            ys.append(y)
        return self.cv2(torch.cat([a, b, *ys], 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max pools concatenated.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        hidden = in_ch // 2
        self.cv1 = Conv(in_ch, hidden, 1)
        self.cv2 = Conv(hidden * 4, out_ch, 1)
        self.m = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pyramid pooling.

        Args:
            x: Input of shape ``(N, in_ch, H, W)``.

        Returns:
            Output of shape ``(N, out_ch, H, W)``.
        """
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        y3 = self.m(y2)
        return self.cv2(torch.cat([x, y1, y2, y3], 1))


class YoloNet(nn.Module):
    """Backbone (P3, P4 levels) + SPPF + one FPN top-down step + two 1x1 heads.

    Args:
        num_outputs: Channels of each head (anchors * (5 + classes)).
        width: Base width; levels use ``2 * width`` and ``4 * width`` channels.
    """

    def __init__(self, num_outputs: int = 18, width: int = 16) -> None:
        super().__init__()
        w3, w4 = 2 * width, 4 * width
        self.stem = Conv(3, width, 3, stride=2)
        self.down3 = Conv(width, w3, 3, stride=2)
        self.c2f3 = C2f(w3, w3, n=1, shortcut=True)
        self.down4 = Conv(w3, w4, 3, stride=2)
        self.c2f4 = C2f(w4, w4, n=2, shortcut=True)
        self.sppf = SPPF(w4, w4)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck3 = C2f(w4 + w3, w3, n=1, shortcut=False, use_chunk=True)
        self.head3 = nn.Conv2d(w3, num_outputs, 1)
        self.head4 = nn.Conv2d(w4, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the detector.

        Args:
            x: Images of shape ``(N, 3, H, W)``.

        Returns:
            Head outputs at strides 4 and 8: ``(N, num_outputs, H/4, W/4)`` and
            ``(N, num_outputs, H/8, W/8)``.
        """
        p3 = self.c2f3(self.down3(self.stem(x)))
        p4 = self.sppf(self.c2f4(self.down4(p3)))
        n3 = self.neck3(torch.cat([self.upsample(p4), p3], 1))
        return self.head3(n3), self.head4(p4)


def yolo_block() -> nn.Module:
    """Tiny YOLO-style detector with C2f (split and chunk), SPPF and an FPN concat."""
    return init_weights(YoloNet())
