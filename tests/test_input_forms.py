"""The float64 oracle takes every input form the compile takes: dicts and nested tuples of tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.conftest import check_pruned


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d, self.a = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1), nn.Linear(5, 4)

    def forward(self, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.d(torch.relu(self.c(inp["img"]))).mean((2, 3)) + self.a(inp["aux"])


class NestedNet(DictNet):
    def forward(self, pair: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:  # type: ignore[override]
        img, (aux, scale) = pair
        return (self.d(torch.relu(self.c(img))).mean((2, 3)) + self.a(aux)) * scale


@pytest.mark.parametrize("output", ["graph", "module"])
def test_dict_inputs_are_verified_in_float64(output: str) -> None:
    torch.manual_seed(0)
    x = {"img": torch.randn(2, 3, 8, 8), "aux": torch.randn(2, 5)}
    check_pruned(DictNet().eval(), (x,), output=output)


def test_nested_tuple_inputs_are_verified_in_float64() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8, 8), (torch.randn(2, 5), torch.tensor(2.0)))
    check_pruned(NestedNet().eval(), (x,), output="module")
