"""Every bad input gives a typed ``FxPruneError`` whose message names the problem and what to do, and
leaves the caller's model untouched; nothing crashes with a bare Python error."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.pipeline
from fxprune import ArgumentError, FxPruneError, ModelLoadError, PlanMismatchError, ShapeError
from fxprune.cli import main
from fxprune.model_loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(1, 3, 16, 16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


class TwoInputs(Net):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) + y


class NeedsWidth32(Net):
    """Untraceable (a branch on the input) and raising on the example inputs: the piecewise path runs it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32:
            raise ValueError("this net needs width 32")
        return super().forward(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, t in before.items():
        assert after[k].device == t.device, k
        if not t.is_meta:
            assert torch.equal(t, after[k]), k


@pytest.fixture
def net() -> Iterator[nn.Module]:
    torch.manual_seed(0)
    yield Net().eval()


def test_argument_error_is_public_and_a_value_error() -> None:
    assert fxprune.ArgumentError is ArgumentError and "ArgumentError" in fxprune.__all__
    assert issubclass(ArgumentError, FxPruneError) and issubclass(ArgumentError, ValueError)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"ratio": 1.5}, "ratio must be a number"),
    ({"ratios": {"a": -0.1}}, "ratio for 'a'"),
    ({"round_to": 0}, "round_to must be a positive integer"),
    ({"min_channels": 0}, "min_channels must be a positive integer"),
    ({"output": "onnx"}, "output must be 'graph'"),
    ({"ignore": ["nope"]}, "names no submodule"),
    ({"ignore": [3]}, "ignore entries must be module names or types"),
    ({"importance": "magic"}, "unknown importance"),
    ({"importance": "taylor"}, "taylor importance needs data"),
])
def test_bad_arguments_are_argument_errors(net: nn.Module, kwargs: dict[str, Any], needle: str) -> None:
    before = snapshot(net)
    with pytest.raises(ArgumentError, match=needle):
        fxprune.compile(net, example_inputs=(X,), **kwargs)
    assert_unchanged(net, before)


def test_not_a_module() -> None:
    with pytest.raises(ArgumentError, match="model must be a torch.nn.Module, got str"):
        fxprune.compile("resnet50", example_inputs=(X,))  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="model must be a torch.nn.Module"):
        fxprune.analyze(None, (X,))  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_script_module_is_refused(net: nn.Module) -> None:
    scripted = torch.jit.script(net)
    before = snapshot(scripted)
    needle = "script modules cannot be traced by torch.fx; pass the eager nn.Module"
    with pytest.raises(ArgumentError, match=needle):
        fxprune.compile(scripted, example_inputs=(X,))
    with pytest.raises(ArgumentError, match="script modules cannot be traced"):
        fxprune.analyze(scripted, (X,))
    assert_unchanged(scripted, before)


def test_dict_example_inputs_ask_for_a_positional_tuple(net: nn.Module) -> None:
    before = snapshot(net)
    needle = r"pass a tuple in forward's positional order, e\.g\. \(example_inputs\['x'\],\)"
    with pytest.raises(ArgumentError, match=needle):
        fxprune.compile(net, example_inputs={"x": X})
    with pytest.raises(ArgumentError, match="keyword inputs are not supported"):
        fxprune.analyze(net, {"x": X})
    with pytest.raises(ArgumentError, match="tuple of inputs in forward's positional order, got str"):
        fxprune.compile(net, example_inputs="x")
    assert_unchanged(net, before)


def test_wrong_input_shape_is_a_shape_error_naming_the_exception(net: nn.Module) -> None:
    before = snapshot(net)
    with pytest.raises(ShapeError, match=r"RuntimeError: .*input\[1, 5, 16, 16\] to have 3 channels"):
        fxprune.compile(net, example_inputs=(torch.randn(1, 5, 16, 16),))
    assert_unchanged(net, before)


def test_untraceable_forward_that_raises_is_a_shape_error() -> None:
    model = NeedsWidth32().eval()
    before = snapshot(model)
    with pytest.raises(ShapeError, match="ValueError: this net needs width 32"):
        fxprune.compile(model, example_inputs=(X,))  # the root cannot be traced: the piecewise path runs it
    assert_unchanged(model, before)


def test_too_many_and_too_few_example_inputs(net: nn.Module) -> None:
    before = snapshot(net)
    with pytest.raises(ArgumentError, match=r"2 example inputs given, but Net.forward\(x\) takes at most 1"):
        fxprune.compile(net, example_inputs=(X, X))
    assert_unchanged(net, before)
    two = TwoInputs().eval()
    before = snapshot(two)
    with pytest.raises(ArgumentError, match=r"TwoInputs.forward\(x, y\) needs 2.*\(x, y\)"):
        fxprune.compile(two, example_inputs=(X,))
    assert_unchanged(two, before)


def test_meta_example_inputs(net: nn.Module) -> None:
    before = snapshot(net)
    with pytest.raises(ArgumentError, match=r"example input 0 is on the meta device.*randn\(1, 3, 16, 16\)"):
        fxprune.compile(net, example_inputs=(X.to("meta"),))
    assert_unchanged(net, before)


def test_meta_buffer(net: nn.Module) -> None:
    net.bn.running_mean = net.bn.running_mean.to("meta")
    before = snapshot(net)
    with pytest.raises(ArgumentError, match="buffer bn.running_mean is on the meta device"):
        fxprune.compile(net, example_inputs=(X,))
    assert_unchanged(net, before)


def test_meta_parameter_is_still_refused(net: nn.Module) -> None:
    with torch.device("meta"):
        meta = Net()
    with pytest.raises(FxPruneError, match="is on the meta device"):
        fxprune.compile(meta, example_inputs=(X,))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad output path must be refused before any work: analysis must not start."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("analysis ran before the output path was checked")

    monkeypatch.setattr(fxprune.pipeline, "prepare", refuse)


@pytest.mark.usefixtures("no_work")
def test_onnx_path_whose_parent_is_a_file(net: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    before = snapshot(net)
    with pytest.raises(ArgumentError, match="is a file, not a directory"):
        fxprune.compile(net, example_inputs=(X,), onnx=str(tmp_path / "f" / "deeper" / "m.onnx"))
    assert_unchanged(net, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.usefixtures("no_work")
def test_onnx_path_that_is_a_directory(net: nn.Module, tmp_path: Path) -> None:
    before = snapshot(net)
    with pytest.raises(ArgumentError, match="is an existing directory; pass a file path inside it"):
        fxprune.compile(net, example_inputs=(X,), onnx=tmp_path)
    with pytest.raises(ArgumentError, match="onnx must be a file path"):
        fxprune.compile(net, example_inputs=(X,), onnx=3)
    assert_unchanged(net, before)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_work")
def test_onnx_path_in_a_directory_that_is_not_writable(net: nn.Module, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root may write anywhere: simulate the refusal for this folder only
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
        before = snapshot(net)
        with pytest.raises(ArgumentError, match="is not writable"):
            fxprune.compile(net, example_inputs=(X,), onnx=str(locked / "m.onnx"))
        assert_unchanged(net, before)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_apply_missing_plan(net: nn.Module) -> None:
    before = snapshot(net)
    with pytest.raises(ArgumentError, match="plan file not found: missing.json"):
        fxprune.apply(net, "missing.json", (X,))
    with pytest.raises(ArgumentError, match="plan must be a PruningPlan or the path"):
        fxprune.apply(net, 3, (X,))  # type: ignore[arg-type]
    assert_unchanged(net, before)


def test_apply_unreadable_plan(net: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    before = snapshot(net)
    for path in (tmp_path, tmp_path / "f" / "plan.json", tmp_path / "binary.json"):
        with pytest.raises(ArgumentError, match="cannot read plan file"):
            fxprune.apply(net, path, (X,))
    assert_unchanged(net, before)


@pytest.mark.parametrize(("text", "needle"), [
    ("not json at all", "is not a JSON file"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"format": "other"}', "not an fxprune plan"),
    ('{"format": "fxprune-plan/1", "ratio": 0.5}', "missing field 'groups'"),
    ('{"format": "fxprune-plan/1", "ratio": 0.5, "groups": {}}', "'groups' must be a list"),
    ('{"format": "fxprune-plan/1", "ratio": 0.5, "groups": [{"id": 0}]}', "missing field 'kept'"),
    ('{"format": "fxprune-plan/1", "ratio": 0.5, "groups": [3]}', "malformed fxprune plan"),
    ('{"format": "fxprune-plan/1", "ratio": "half", "groups": []}', "malformed fxprune plan"),
])
def test_apply_bad_plan_file(net: nn.Module, tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    before = snapshot(net)
    with pytest.raises(PlanMismatchError, match=needle):
        fxprune.apply(net, str(path), (X,))
    assert_unchanged(net, before)


def test_apply_accepts_a_path_object(net: nn.Module, tmp_path: Path) -> None:
    result = fxprune.prune(net, 0.5, example_inputs=(X,))
    result.plan.save(tmp_path / "plan.json")
    replayed = fxprune.apply(Net().eval(), tmp_path / "plan.json", (X,))
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {
        k: v.shape for k, v in result.model.state_dict().items()}
    json.loads((tmp_path / "plan.json").read_text())  # still plain JSON


@pytest.mark.parametrize(("scores", "needle"), [
    (np.nan, r"non-finite scores for group 0 \(channel 0 is NaN\)"),
    (np.inf, r"non-finite scores for group 0 \(channel 0 is infinite\)"),
    (-np.inf, "non-finite scores for group 0"),
])
def test_importance_returning_non_finite_scores(net: nn.Module, scores: float, needle: str) -> None:
    def criterion(g: fxprune.GroupTensors) -> np.ndarray:
        return np.full(g.size, scores)

    before = snapshot(net)
    with pytest.raises(ArgumentError, match=needle):
        fxprune.compile(net, example_inputs=(X,), importance=criterion)
    assert_unchanged(net, before)


def test_importance_one_nan_among_finite_scores(net: nn.Module) -> None:
    def criterion(g: fxprune.GroupTensors) -> np.ndarray:
        s = np.arange(g.size, dtype=float)
        s[3] = np.nan
        return s

    needle = r"importance criterion returned 1 non-finite scores for group 0 \(channel 3 is NaN\)"
    with pytest.raises(ArgumentError, match=needle):
        fxprune.compile(net, example_inputs=(X,), importance=criterion)


def test_importance_wrong_shape_type_or_failure(net: nn.Module) -> None:
    before = snapshot(net)
    with pytest.raises(ArgumentError, match=r"returned shape \(3,\) for group 0 of 8 channels"):
        fxprune.compile(net, example_inputs=(X,), importance=lambda g: np.ones(3))
    with pytest.raises(ArgumentError, match="returned str for group 0"):
        fxprune.compile(net, example_inputs=(X,), importance=lambda g: "high")
    with pytest.raises(ArgumentError, match="failed on group 0 .*ZeroDivisionError"):
        fxprune.compile(net, example_inputs=(X,), importance=lambda g: 1 / 0)
    assert_unchanged(net, before)
    scores = fxprune.prune(net, 0.5, example_inputs=(X,), importance=lambda g: torch.arange(g.size).float())
    assert scores.modified  # a tensor of finite scores is accepted


EXITS_AT_IMPORT = """
import sys
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.a(x)


sys.exit("train.py: run me as a script")
"""

PARSES_ARGV_AT_IMPORT = """
import argparse
import torch.nn as nn

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, required=True)
args = parser.parse_args()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.a(x)
"""

READS_ARGV_AT_IMPORT = """
import argparse
import sys
import torch.nn as nn

parser = argparse.ArgumentParser()
parser.add_argument("--width", type=int, default=8)
WIDTH = parser.parse_args().width
ARGV = list(sys.argv)
sys.stderr.write("model file says hello\\n")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, WIDTH, 3)

    def forward(self, x):
        return self.a(x)


def factory_that_exits():
    raise SystemExit(3)
"""


@pytest.mark.parametrize(("source", "needle"), [
    (EXITS_AT_IMPORT, "called sys.exit('train.py: run me as a script')"),
    (PARSES_ARGV_AT_IMPORT, "the following arguments are required: --epochs"),
])
def test_cli_model_file_that_exits_at_import(source: str, needle: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(source)
    argv = list(sys.argv)
    code = main(["analyze", "train.py:Net", "--input-shape", "1,3,16,16"])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("fxprune analyze: error:") and needle in lines[0], lines[0]
    assert "if __name__ == '__main__'" in lines[0]
    assert out == "" and "Traceback" not in err
    assert sys.argv == argv


def test_model_file_sees_only_its_own_name_in_argv(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "net_file.py"
    path.write_text(READS_ARGV_AT_IMPORT)
    loaded = load_model(f"{path}:Net")
    assert loaded.model.a.out_channels == 8  # fxprune's own arguments were not parsed by the model file
    seen = sys.modules[type(loaded.model).__module__].ARGV
    assert seen == [str(path)]  # sys.argv while it was imported
    assert "model file says hello" in capsys.readouterr().err  # what it wrote to stderr is passed on
    with pytest.raises(ModelLoadError, match=r"factory_that_exits\(\) called sys.exit\(3\)"):
        load_model(f"{path}:factory_that_exits")


def test_scripted_submodule_is_kept_whole() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3)
            self.s = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU()))
            self.b = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.s(self.a(x)))

    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    r = fxprune.prune(model, 0.5, example_inputs=(x,), verify=True)
    assert r.oracle is not None and r.oracle.passed
    torch.testing.assert_close(r.model(x), model(x))  # nothing around the scripted part could be cut


def test_legacy_weight_norm_is_a_clear_error() -> None:
    from torch.nn.utils import weight_norm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), weight_norm(torch.nn.Conv2d(8, 4, 1)))
    with pytest.raises(fxprune.FxPruneError, match="parametrizations.weight_norm"):
        fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),))
