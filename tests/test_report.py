"""The compile report: JSON equals the data, Markdown shows it, chart and diagram are drawn, nothing partial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fxprune
import fxprune.report as report_mod
import models_zoo
from fxprune.metrics import count_macs, count_params
from fxprune.report import build_report, groups_dot, layer_channels, render_markdown, write_report


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a small shared machine contend and slow every op
    try:
        model, inputs = models_zoo.get("resnet_basic")
        result = fxprune.prune(model, 0.5, example_inputs=inputs, verify=True)
    finally:
        torch.set_num_threads(previous)
    before = {"params": count_params(model), "macs": count_macs(model, inputs), "onnx_bytes": 1000, "latency_ms": 2.0}
    after = {"params": result.params_after, "macs": count_macs(result.model, inputs), "onnx_bytes": 400,
             "latency_ms": 1.0}
    return build_report(
        model="models_zoo:resnet_basic", input_shapes=[(1, 3, 32, 32)], options={"ratio": 0.5, "round_to": None},
        before=before, after=after, groups=result.plan.groups, kept=result.plan.kept,
        layers=layer_channels(model, result.model), oracle=result.oracle,
        latency={"runs": 7, "threads": 1}, environment={"torch": torch.__version__},
    )


def test_build_report_is_json_ready_and_complete(data: dict[str, Any]) -> None:
    assert json.loads(json.dumps(data)) == data
    assert data["oracle"]["passed"] is True
    groups = data["groups"]
    assert [g["id"] for g in groups] == list(range(len(groups)))
    assert all(g["kept"] == g["total"] // 2 for g in groups if g["prunable"])
    unpruned = [g for g in groups if not g["prunable"]]
    assert len(unpruned) == 1 and unpruned[0]["kept"] == unpruned[0]["total"] == 10
    assert unpruned[0]["reason"] == "model output (at fc[1])"


def test_layer_channels_follow_the_state_dict(data: dict[str, Any]) -> None:
    rows = {r["name"]: r for r in data["layers"]}
    assert rows["conv1"] == {"name": "conv1", "before": 16, "after": 8}
    assert rows["fc"] == {"name": "fc", "before": 10, "after": 10}
    assert "bn1" not in rows  # rank-1 weights (norms) are not layers of the chart


def test_markdown_shows_table_groups_and_reasons(data: dict[str, Any]) -> None:
    md = render_markdown(data, {"chart": "r_channels.png"})
    assert f"| parameters | {data['before']['params']:,} | {data['after']['params']:,} |" in md
    assert "| ONNX size (bytes) | 1,000 | 400 | 0.40x |" in md
    assert "CPU latency, median of 7 runs, 1 thread (ms) | 2.00 | 1.00 | 0.50x |" in md
    assert "| 0 | 8 / 16 | `conv1.weight[0]` |" in md
    assert "### Groups left unpruned" in md and "| 6 | 10 | model output (at fc[1]) |" in md
    assert "[r_channels.png](r_channels.png)" in md and "Mask oracle" in md and "passed" in md


def test_groups_dot_links_groups_to_layers(data: dict[str, Any]) -> None:
    dot = groups_dot(data)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert 'g0 -> "conv1" [label="out"' in dot
    assert 'g0 -> "layers.0.0.conv1" [label="in"' in dot  # conv1's outputs feed the next block
    assert "fillcolor=lightgray" in dot  # the unprunable output group


def test_write_report_writes_all_files_atomically(data: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_mod.shutil, "which", lambda name: None)  # no Graphviz: the DOT text stays
    files = write_report(tmp_path / "r.md", data)
    assert json.loads(files.json.read_text()) == data
    assert files.markdown.read_text() == render_markdown(
        data, {"per-layer channels (PNG)": "r_channels.png", "coupled-group diagram": "r_groups.dot"})
    assert files.chart is not None and files.chart.read_bytes()[:4] == b"\x89PNG"
    assert files.dot.read_text() == groups_dot(data) and files.rendered is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r_channels.png", "r_groups.dot"]


def test_write_report_failure_leaves_nothing(data: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_mod, "render_markdown", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(tmp_path / "r.md", data)
    assert list(tmp_path.iterdir()) == []


def test_oracle_without_a_figure_renders(data: dict[str, Any]) -> None:
    """An oracle reported "not applicable" has no max abs diff (None in JSON): the report still renders."""
    odd = {**data, "oracle": {"applicable": False, "reason": "a rule marked it inexact", "max_abs_diff": None,
                              "passed": False}}
    md = render_markdown(odd)
    assert "not applicable: a rule marked it inexact, max abs diff -." in md


def test_a_failing_report_keeps_the_other_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from fxprune.cli import main

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("unsupported format string passed to NoneType.__format__")

    monkeypatch.setattr(report_mod, "write_report", broken)
    monkeypatch.chdir(tmp_path)
    code = main(["compile", "models_zoo:mlp", "--ratio", "0.5", "--onnx", "m.onnx", "--report", "r.md",
                 "--save-plan", "plan.json", "--runs", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "report was not written" in err
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "plan.json").is_file()


# --- the figures: rendered with Agg and checked for what makes them readable --------------------------------


def _resnet50_layers() -> list[dict[str, Any]]:
    """The 54 conv/linear layers of torchvision's resnet50, each kept at one of four fractions."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50()
    return [{**row, "after": max(1, row["before"] * (i % 4 + 1) // 4)}
            for i, row in enumerate(layer_channels(model, model))]


def test_channel_chart_reads_at_a_glance(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    layers = _resnet50_layers()
    fig = report_mod.channels_figure(layers, "torchvision:resnet50")
    try:
        assert len(fig.axes) == 2
        frac, chans = fig.axes
        lo, hi = frac.get_xlim()
        assert 0.0 <= lo < hi <= 1.05
        widths = [p.get_width() for p in frac.patches]
        assert widths == pytest.approx([r["after"] / r["before"] for r in layers])
        assert chans.get_xscale() == "log"
        assert chans.get_xlim()[0] <= min(r["after"] for r in layers)
        names = [t.get_text() for t in frac.get_yticklabels()]
        assert names == [r["name"] for r in layers]  # every layer named, first on top
        assert frac.get_ylim()[0] > frac.get_ylim()[1]
        fonts = [t.get_fontsize() for ax in fig.axes for t in [*ax.get_yticklabels(), *ax.get_xticklabels()]]
        assert min(fonts) >= 7
        assert fig.get_figheight() >= 0.15 * len(layers)  # about 12 pt per layer
        fig.savefig(tmp_path / "c.png", dpi=100)
    finally:
        plt.close(fig)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_channel_chart_thins_names_of_very_deep_models() -> None:
    import matplotlib.pyplot as plt

    layers = [{"name": f"model.decoder.layers.{i // 6}.fc{i % 6}", "before": 768, "after": 1 + i} for i in range(400)]
    fig = report_mod.channels_figure(layers, "deep")
    try:
        ticks, step = fig.axes[0].get_yticklabels(), int(fig.axes[0].get_yticks()[1])
        assert fig.get_figheight() <= 40 and 100 <= len(ticks) < 400
        assert min(t.get_fontsize() for t in ticks) >= 7
        assert [t.get_text() for t in ticks] == [r["name"] for r in layers][::step]
    finally:
        plt.close(fig)


def test_sensitivity_lines_stay_apart_past_ten_groups(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from fxprune.plan import ChannelGroup
    from fxprune.sensitivity_analysis import SensitivityResult

    groups = tuple(ChannelGroup(i, 8, (f"conv{i}.weight[0]",), (f"conv{i}.weight[0]",), 0, ()) for i in range(14))
    metric = {g.id: (0.9 - 0.01 * g.id, 0.8 - 0.02 * g.id, 0.7 - 0.03 * g.id) for g in groups}
    sens = SensitivityResult(0.95, (0.25, 0.5, 0.75), groups, metric, {g.id: (0.9, 0.8, 0.7) for g in groups})
    fig = sens.figure(top=12)
    try:
        lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() != "unpruned"]
        assert len(lines) == 12
        assert len({(to_hex(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 12
        assert lines[0].get_label() == "13: conv13"  # most sensitive first
        assert len(fig.axes[0].get_legend().get_texts()) == 13
    finally:
        plt.close(fig)
    sens.plot(str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_dependency_graph_of_resnet18_has_no_overlaps(tmp_path: Path) -> None:
    import importlib.util

    import matplotlib.pyplot as plt
    import numpy as np

    torchvision = pytest.importorskip("torchvision")
    path = Path(__file__).resolve().parents[1] / "examples" / "draw_dependency_graph.py"
    spec = importlib.util.spec_from_file_location("draw_dependency_graph", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    g, rows = example.channel_graph(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    pos = example.layered_layout(g, rows)
    assert set(pos) == set(g.nodes) and len(g) > 150
    xy = np.array(list(pos.values()))
    gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 1e9
    assert gaps.min() >= 1.0 - 1e-9  # grid points, one apart at least
    assert all(pos[s][0] == 0 for s in g.nodes if not s[0].startswith("param:"))  # the activation spine

    fig = example.draw(g, rows, "torchvision:resnet18")
    try:
        fig.savefig(tmp_path / "g.png", dpi=110)
        ax = fig.axes[0]
        boxes = [t.get_window_extent() for t in ax.texts]
        assert len(boxes) == len(g)
        overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
        assert overlaps == []  # no two node labels overlap either
    finally:
        plt.close(fig)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
