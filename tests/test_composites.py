"""Known third-party composites (registry entries with ``qualifies``, ``rules/builtin.py``) are traced as one leaf with an exact rule.

timm's BatchNormAct2d is the one entry: its forward is ``F.batch_norm`` over dim 1, then ``drop``, then
``act``. It is kept whole only when both parts are parameter-free elementwise modules of exact known
types; anything else is traced through, as every library module is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fxprune.passes.export import export_onnx
from fxprune.passes.trace import trace
from fxprune.rules.registry import composite
from tests.conftest import check_pruned

timm_norm_act = pytest.importorskip("timm.layers.norm_act")
BatchNormAct2d = timm_norm_act.BatchNormAct2d


def _norm_act(c: int, **kwargs: object) -> nn.Module:
    m = BatchNormAct2d(c, **kwargs)
    with torch.no_grad():
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
    return m


class NormActNet(nn.Module):
    """Conv -> norm-act (ReLU) -> conv -> norm-act (no act) + residual -> norm-act (``act``) -> head."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _norm_act(8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _norm_act(8, apply_act=False)
        self.c3, self.n3 = nn.Conv2d(8, 8, 1, bias=False), _norm_act(8)
        if act is not None:
            self.n3.act = act
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n1(self.c1(x))
        y = y + self.n2(self.c2(y))
        return self.head(self.n3(self.c3(y)))


def _leaves(model: nn.Module) -> set[str]:
    gm, _ = trace(model)
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}


def test_norm_act_is_one_leaf_and_prunes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = NormActNet().eval()
    assert {"n1", "n2", "n3"} <= _leaves(model)
    x = (torch.randn(2, 3, 8, 8),)
    r = check_pruned(model, x, 0.5)
    for name in ("n1", "n2", "n3"):
        m = r.model.get_submodule(name)
        assert type(m) is BatchNormAct2d and m.num_features == m.weight.shape[0] == m.running_var.shape[0]
    assert r.model.get_submodule("c1").out_channels == r.model.get_submodule("n1").num_features < 8
    report = export_onnx(r.model, x, tmp_path / "na.onnx")
    assert report.max_abs_diff < 1e-4


def test_norm_act_in_training_mode_still_runs_its_own_forward() -> None:
    """The leaf is the user's module: in training mode it uses batch statistics and counts batches."""
    torch.manual_seed(0)
    model = NormActNet().eval()
    r = check_pruned(model, (torch.randn(2, 3, 8, 8),), 0.5)
    pruned = r.model.train()
    before = int(pruned.get_submodule("n1").num_batches_tracked)
    pruned(torch.randn(4, 3, 8, 8))
    assert int(pruned.get_submodule("n1").num_batches_tracked) == before + 1


class _Subclass(BatchNormAct2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flip(1)  # not channelwise: must not be taken for the composite


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.PReLU(8),  # a per-channel parameter: not an elementwise part
        lambda: nn.Sequential(nn.ReLU()),  # a container: its parts are not read here
        lambda: pytest.importorskip("timm.layers.activations").GELUTanh(),  # timm's own activation class
    ],
)
def test_other_parts_are_traced_through(make: object) -> None:
    torch.manual_seed(0)
    model = NormActNet(make()).eval()  # type: ignore[operator]
    assert composite(model.n3) is None and composite(model.n1) is not None
    assert "n3" not in _leaves(model)
    check_pruned(model, (torch.randn(2, 3, 8, 8),), 0.5)


def test_a_subclass_is_not_the_composite() -> None:
    torch.manual_seed(0)
    model = NormActNet().eval()
    sub = _Subclass(8)
    sub.load_state_dict(model.n3.state_dict())
    model.n3 = sub
    assert composite(sub) is None and "n3" not in _leaves(model)
    r = check_pruned(model, (torch.randn(2, 3, 8, 8),), 0.5)
    assert r.model.get_submodule("c3").out_channels == 8  # flip over channels pins them
