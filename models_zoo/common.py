"""Shared building blocks and seeded initialisation for the model zoo.

Every zoo builder finishes with :func:`init_weights`, which draws all
parameters and BatchNorm buffers from the global torch RNG. Because
:func:`models_zoo.get` seeds that RNG right before building, a (name, seed)
pair fully determines the model's ``state_dict``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ConvBNAct", "init_weights", "randomize_batchnorm"]


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d and an optional activation.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        kernel_size: Square kernel size; padding keeps the spatial size at stride 1.
        stride: Convolution stride.
        groups: Convolution groups (``groups == in_ch == out_ch`` for depthwise).
        act: Activation module to append, or ``None`` for a linear projection.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: nn.Module | None = None,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act)
        super().__init__(*layers)


def randomize_batchnorm(bn: _BatchNorm) -> None:
    """Give a BatchNorm layer non-trivial, seeded affine params and running stats.

    The running variance stays in ``[0.5, 1.5]`` and the scale in ``[0.5, 1.0]``
    so activations remain O(1) while every statistic differs from its default.

    Args:
        bn: The BatchNorm module to modify in place (uses the global torch RNG).
    """
    with torch.no_grad():
        if bn.running_mean is not None and bn.running_var is not None:
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        if bn.weight is not None and bn.bias is not None:
            bn.weight.uniform_(0.5, 1.0)
            bn.bias.normal_(0.0, 0.1)


def _conv_transpose_std(m: nn.ConvTranspose2d) -> float:
    """He-normal std for a transposed conv, based on its true per-output fan-in.

    Args:
        m: The transposed convolution.

    Returns:
        The standard deviation ``sqrt(2 / fan_in)``.
    """
    taps = math.prod(m.kernel_size) / math.prod(m.stride)
    fan_in = max(1.0, (m.in_channels / m.groups) * taps)
    return math.sqrt(2.0 / fan_in)


def init_weights(model: nn.Module) -> nn.Module:
    """Initialise all weights of ``model`` from the global torch RNG.

    Convolutions and linear layers get He-normal (fan-in, ReLU gain) weights and
    small uniform biases; BatchNorm layers get random stats via
    :func:`randomize_batchnorm`.

    Args:
        model: The model to initialise in place.

    Returns:
        The same model, for chaining.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.normal_(0.0, _conv_transpose_std(m))
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, _BatchNorm):
                randomize_batchnorm(m)
    return model
