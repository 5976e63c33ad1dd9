"""Miscellaneous small models: flatten-into-Linear classifiers and a residual MLP."""

from __future__ import annotations

import torch
from torch import nn

from models_zoo.common import ConvBNAct, init_weights

__all__ = ["MLP", "FlattenLinearNet", "flatten_linear", "flatten_linear_fn", "mlp"]


class FlattenLinearNet(nn.Module):
    """Conv classifier with no adaptive pool: the Linear sees ``C * 8 * 8`` features.

    Args:
        widths: Output channels of the two conv stages.
        use_view: Flatten with ``x.view(x.size(0), -1)`` after ``nn.MaxPool2d(2)``;
            otherwise use ``torch.flatten(x, 1)`` after ``nn.AvgPool2d(2)``.
        hidden: Width of the hidden Linear layer.
        num_classes: Size of the linear head.
    """

    def __init__(
        self,
        widths: tuple[int, int] = (16, 32),
        use_view: bool = True,
        hidden: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        w1, w2 = widths
        self.use_view = use_view
        self.conv1 = ConvBNAct(3, w1, 3, act=nn.ReLU(inplace=True))
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = ConvBNAct(w1, w2, 3, act=nn.ReLU(inplace=True))
        self.pool2: nn.Module = nn.MaxPool2d(2) if use_view else nn.AvgPool2d(2)
        self.fc1 = nn.Linear(w2 * 8 * 8, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of 32x32 images.

        Args:
            x: Images of shape ``(N, 3, 32, 32)``.

        Returns:
            Logits of shape ``(N, num_classes)``.
        """
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        x = x.view(x.size(0), -1) if self.use_view else torch.flatten(x, 1)
        return self.fc2(self.relu(self.fc1(x)))


class MLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear with a residual add around the equal-width layer.

    Args:
        in_features: Input features.
        hidden: Width of both hidden layers.
        num_classes: Output features.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Args:
            x: Input of shape ``(N, in_features)``.

        Returns:
            Output of shape ``(N, num_classes)``.
        """
        h = self.relu1(self.fc1(x))
        h = h + self.relu2(self.fc2(h))
        return self.fc3(h)


def flatten_linear() -> nn.Module:
    """Conv net ending in ``x.view(x.size(0), -1)`` into ``Linear(32*8*8, 64)``."""
    return init_weights(FlattenLinearNet(use_view=True))


def flatten_linear_fn() -> nn.Module:
    """Conv net ending in ``nn.AvgPool2d(2)`` + ``torch.flatten(x, 1)`` into ``Linear(24*8*8, 64)``."""
    return init_weights(FlattenLinearNet(widths=(16, 24), use_view=False))


def mlp() -> nn.Module:
    """Residual MLP on 64 features: 64 -> 128 -> 128 (+ residual) -> 10."""
    return init_weights(MLP())
