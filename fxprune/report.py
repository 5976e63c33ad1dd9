"""The compile report: Markdown and JSON with the same data, a PNG channel chart and a DOT group diagram.

``build_report`` gathers everything into one JSON-ready dict; ``write_report`` renders it. The Markdown,
the chart and the diagram are all drawn from that dict, so ``report.json`` holds exactly what the
Markdown shows. Files are written to a temporary directory beside the report and moved into place at the
end, so a failure leaves no partial file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fxprune.plan import ChannelGroup

log = logging.getLogger(__name__)

__all__ = ["ReportFiles", "build_report", "channels_figure", "groups_dot", "layer_channels", "render_markdown",
           "write_report"]


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`write_report` wrote.

    Attributes:
        markdown: The ``.md`` report.
        json: ``<stem>.json`` beside it.
        chart: ``<stem>_channels.png`` (None when there are no layers to draw).
        dot: ``<stem>_groups.dot``, the coupled-group diagram.
        rendered: ``<stem>_groups.svg`` when Graphviz ``dot`` is on PATH, else None.
    """

    markdown: Path
    json: Path
    chart: Path | None
    dot: Path
    rendered: Path | None


def layer_channels(before: nn.Module, after: nn.Module) -> list[dict[str, Any]]:
    """Output channels of every weight of rank >= 2 (conv, linear) before and after pruning, by name."""
    shapes_after = {k: tuple(v.shape) for k, v in after.state_dict().items()}
    rows = []
    for name, tensor in before.state_dict().items():
        if name.endswith("weight") and tensor.dim() >= 2 and name in shapes_after:
            rows.append({"name": name.removesuffix(".weight"), "before": int(tensor.shape[0]),
                         "after": int(shapes_after[name][0])})
    return rows


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def build_report(
    *,
    model: str,
    input_shapes: Sequence[Sequence[int]],
    options: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    groups: Sequence[ChannelGroup],
    kept: Sequence[Sequence[int]],
    layers: Sequence[dict[str, Any]],
    latency: dict[str, Any] | None = None,
    oracle: Any = None,
    onnx: Any = None,
    quantization: Any = None,
    environment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Gather a compile run into one JSON-ready dict (the single source of every rendering).

    Args:
        model: The MODEL spec.
        input_shapes: Shapes of the example inputs.
        options: The options of the run (ratio, targets, rounding, ...).
        before: ``params``, ``macs``, ``onnx_bytes``, ``latency_ms`` of the original model (None if unknown).
        after: The same for the pruned model.
        groups: The coupled channel groups of the plan.
        kept: Per group, the kept channel positions.
        layers: Rows of :func:`layer_channels`.
        latency: ``runs`` and ``threads`` of the latency medians.
        oracle: The mask-oracle report, if run.
        onnx: The ``ExportReport`` of the pruned model, if exported.
        quantization: The ``QuantReport``, if quantised.
        environment: Versions and machine.
    """
    group_rows = [
        {"id": g.id, "total": g.size, "kept": len(k), "prunable": g.prunable, "reason": g.reason,
         "producers": list(g.producers), "members": list(g.members)}
        for g, k in zip(groups, kept, strict=True)
    ]
    return _jsonable({
        "model": model, "input_shapes": [list(s) for s in input_shapes], "options": options,
        "before": before, "after": after, "latency": latency or {}, "oracle": oracle, "onnx": onnx,
        "quantization": quantization, "groups": group_rows, "layers": list(layers), "environment": environment or {},
    })


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value:,}{unit}"


def _sci(value: Any) -> str:
    return "-" if value is None else f"{value:.1e}"


def _threads(n: Any) -> str:
    return f"{n} thread" if n == 1 else f"{n if n is not None else '?'} threads"


def _ratio(a: Any, b: Any) -> str:
    return f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"


def render_markdown(data: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """The Markdown report of a :func:`build_report` dict; ``files`` names the chart and diagram to link."""
    files = files or {}
    b, a, lat = data["before"], data["after"], data["latency"]
    shapes = ", ".join("x".join(map(str, s)) for s in data["input_shapes"])
    opts = ", ".join(f"{k}={v}" for k, v in data["options"].items() if v is not None)
    lines = [f"# fxprune report: {data['model']}", "", f"Input {shapes}; {opts}.", "",
             "| | before | after | after/before |", "|---|---:|---:|---:|"]
    for key, label, unit in (("params", "parameters", ""), ("macs", "MACs", ""), ("onnx_bytes", "ONNX size (bytes)", ""),
                             ("latency_ms", f"CPU latency, median of {lat.get('runs', '?')} runs, "
                              f"{_threads(lat.get('threads'))} (ms)", "")):
        lines.append(f"| {label} | {_fmt(b.get(key), unit)} | {_fmt(a.get(key), unit)} | {_ratio(b.get(key), a.get(key))} |")
    if data["oracle"]:
        o = data["oracle"]
        verdict = "passed" if o["passed"] else ("not applicable: " + o["reason"] if not o["applicable"] else "FAILED")
        lines += ["", f"Mask oracle (pruned model == masked original): {verdict}, max abs diff {_sci(o['max_abs_diff'])}."]
    if data["onnx"]:
        x = data["onnx"]
        lines += ["", "## ONNX", "", f"`{x['path']}`: opset {x['opset']}, {x['exporter']} exporter, "
                  f"onnxruntime check max abs diff {_sci(x['max_abs_diff'])} on {x['n_checked_inputs']} inputs"
                  + ("." if x["simplified"] else "; onnxsim skipped."), "",
                  "| | before simplify | after simplify |", "|---|---:|---:|",
                  f"| nodes | {x['nodes_before_simplify']:,} | {x['nodes_after_simplify']:,} |",
                  f"| bytes | {x['bytes_before_simplify']:,} | {x['bytes_after_simplify']:,} |"]
    if data["quantization"]:
        q = data["quantization"]
        lines += ["", "## int8 quantisation", "",
                  f"`{q['path']}`: {q['mode']} ({q['quant_format']}, per-channel {q['per_channel']}), "
                  f"{q['n_samples']} " + (f"RANDOM calibration inputs (seed {q['seed']}; pass --data for real ones)"
                                          if q['seed'] is not None else "calibration inputs you gave (--data)")
                  + f"; onnxruntime, {q['threads']} threads, "
                  f"median of {q['runs']} runs.", "",
                  "| | fp32 pruned | int8 | int8/fp32 |", "|---|---:|---:|---:|",
                  f"| bytes | {q['bytes_fp32']:,} | {q['bytes_int8']:,} | {q['size_ratio']:.2f}x |",
                  f"| latency (ms) | {q['latency_fp32_ms']:.2f} | {q['latency_int8_ms']:.2f} | "
                  f"{_ratio(q['latency_fp32_ms'], q['latency_int8_ms'])} |", "",
                  f"Top-1 agreement with fp32 on the calibration inputs: {q['top1_agreement']:.1%}; "
                  f"output SQNR {_fmt(q['sqnr_db'])} dB; the fp32 model predicts {q['distinct_top1_fp32']} distinct "
                  "class(es)" + (" (agreement is trivial here: random weights, random inputs)."
                                 if q["distinct_top1_fp32"] == 1 else ".")]
    groups = data["groups"]
    lines += ["", f"## Coupled channel groups ({sum(g['prunable'] for g in groups)} of {len(groups)} prunable)", "",
              "| group | kept / total | first producer |", "|---:|---:|---|"]
    lines += [f"| {g['id']} | {g['kept']} / {g['total']} | `{g['producers'][0] if g['producers'] else '-'}` |"
              for g in groups if g["prunable"]]
    kept = [g for g in groups if not g["prunable"]]
    if kept:
        lines += ["", "### Groups left unpruned", "", "| group | channels | reason |", "|---:|---:|---|"]
        lines += [f"| {g['id']} | {g['total']} | {g['reason']} |" for g in kept]
    if files:
        lines += ["", "## Figures", ""] + [f"- {label}: [{name}]({name})" for label, name in files.items()]
    return "\n".join(lines) + "\n"


def groups_dot(data: dict[str, Any]) -> str:
    """Graphviz DOT: one box per coupled group, linked to the layers whose channels it slices.

    A layer linked to two groups (its outputs in one, its inputs in another) shows how groups chain.
    """
    out = ["digraph fxprune_groups {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    layers: set[str] = set()
    edges: set[tuple[int, str, str]] = set()
    for g in data["groups"]:
        color = "palegreen" if g["prunable"] else "lightgray"
        label = f"group {g['id']}\\n{g['kept']} / {g['total']} kept" + ("" if g["prunable"] else f"\\n{g['reason'][:40]}")
        out.append(f'  g{g["id"]} [shape=box, style=filled, fillcolor={color}, label="{_esc(label)}"];')
        for member in g["members"]:
            param, _, dim = member.rpartition("[")
            layer = param.rpartition(".")[0] or param
            layers.add(layer)
            edges.add((g["id"], layer, "out" if dim.rstrip("]") == "0" else "in"))
    out += [f'  "{_esc(n)}" [shape=ellipse];' for n in sorted(layers)]
    out += [f'  g{gid} -> "{_esc(layer)}" [label="{dim}", style={"solid" if dim == "out" else "dashed"}];'
            for gid, layer, dim in sorted(edges)]
    return "\n".join([*out, "}"]) + "\n"


def _esc(text: str) -> str:
    return text.replace('"', '\\"')


def _short(name: str, width: int = 40) -> str:
    """``name`` without its leading components when longer than ``width`` (the tail tells layers apart)."""
    if len(name) <= width:
        return name
    tail = name[len(name) - width + 1:]
    return "\u2026" + (tail.partition(".")[2] or tail)


def channels_figure(layers: Sequence[dict[str, Any]], title: str) -> Any:
    """The per-layer chart of :func:`layer_channels` rows, as a matplotlib ``Figure`` (Agg backend).

    One horizontal bar per layer, in model order from the top. The main panel shows the kept fraction of
    each layer's output channels (0..1, grey where nothing was removed); the second panel the channel
    counts before and after on a log scale, so that 64-channel stems and 2048-channel heads both read.
    The height grows with the number of layers; past about 200 layers only every k-th name is written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    n = len(layers)
    before = [max(int(r["before"]), 0) for r in layers]
    after = [max(int(r["after"]), 0) for r in layers]
    frac = [a / b if b else 1.0 for a, b in zip(after, before, strict=True)]
    total = sum(after) / sum(before) if sum(before) else 1.0
    height = min(40.0, max(3.5, 2.0 + 0.17 * n))
    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(11.0, height), sharey=True, layout="constrained",
                                     gridspec_kw={"width_ratios": [1.2, 1.0]})
    ys = list(range(n))
    pruned, kept = "#2f6da3", "#b8b8b8"
    ax_f.barh(ys, frac, height=0.72, color=[kept if f >= 1.0 else pruned for f in frac])
    ax_f.axvline(total, color="#c44e52", ls="--", lw=1.2)
    ax_f.set_xlim(0.0, 1.05)
    ax_f.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
    ax_f.set_xlabel("fraction of output channels kept", fontsize=9)

    left = max(0.5, min([a for a in after if a > 0] or [1]) / 1.8)
    ax_c.set_xscale("log")
    ax_c.barh(ys, [b - left for b in before], left=left, height=0.8, color="#c6d7ea")
    ax_c.barh(ys, [max(a - left, 0.0) for a in after], left=left, height=0.42, color=pruned)
    pitch_pt = (height - 2.0) * 72 / max(n, 1)  # vertical points per layer
    step = max(1, math.ceil(9.0 / pitch_pt))  # a 7.5 pt name needs about 9 pt
    for y, a, b in list(zip(ys, after, before, strict=True))[::step]:
        ax_c.text(max(b, 1) * 1.12, y, f"{a:,}/{b:,}", va="center", fontsize=7, color="#444444")
    ax_c.set_xlim(left, max(before + [1]) * 3.2)
    ax_c.set_xlabel("output channels after / before (log scale)", fontsize=9)
    ax_c.xaxis.set_major_locator(LogLocator(base=2, numticks=9))  # channel counts are mostly powers of two
    ax_c.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax_c.xaxis.set_minor_locator(NullLocator())

    ax_f.set_yticks(ys[::step])
    ax_f.set_yticklabels([_short(r["name"]) for r in layers][::step], fontsize=7.5)
    ax_f.set_ylim(n - 0.5, -0.5)  # first layer on top
    for ax in (ax_f, ax_c):
        ax.tick_params(axis="x", labelsize=8, labeltop=n > 40, top=n > 40)
        ax.grid(axis="x", which="major", color="#dddddd", lw=0.6)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    ax_c.tick_params(axis="y", left=False)
    handles = [Patch(color=pruned, label="kept fraction, channels after"), Patch(color=kept, label="layer not pruned"),
               Patch(color="#c6d7ea", label="channels before"),
               Line2D([], [], color="#c44e52", ls="--", label=f"all layers: {total:.2f} kept")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    shown = "" if step == 1 else f"; one layer in {step} named"
    fig.suptitle(f"{title}\n{n} layers, {sum(after):,} of {sum(before):,} output channels kept ({total:.0%}){shown}",
                 fontsize=10)
    return fig


def _chart(layers: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = channels_figure(layers, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(path_md: str | os.PathLike[str], data: dict[str, Any], *, chart: bool = True) -> ReportFiles:
    """Write ``path_md`` (Markdown), ``<stem>.json``, ``<stem>_channels.png`` and ``<stem>_groups.dot``.

    The diagram is also rendered to ``<stem>_groups.svg`` when Graphviz ``dot`` is on PATH.

    Args:
        path_md: The Markdown report path; the other files go beside it.
        data: A :func:`build_report` dict.
        chart: Draw the PNG chart (needs matplotlib).

    Returns:
        The paths written.
    """
    md = Path(path_md)
    stem = md.name.removesuffix(md.suffix) if md.suffix else md.name
    names = {"json": f"{stem}.json", "png": f"{stem}_channels.png", "dot": f"{stem}_groups.dot",
             "svg": f"{stem}_groups.svg"}
    stage = Path(tempfile.mkdtemp(prefix=f".{md.name}.", suffix=".tmp", dir=md.parent))
    try:
        draw = chart and bool(data["layers"])
        if draw:
            _chart(data["layers"], stage / names["png"], f"{data['model']}: output channels per layer")
        (stage / names["dot"]).write_text(groups_dot(data))
        rendered = _render_dot(stage / names["dot"], stage / names["svg"])
        links = {"per-layer channels (PNG)": names["png"]} if draw else {}
        links["coupled-group diagram"] = names["svg"] if rendered else names["dot"]
        (stage / names["json"]).write_text(json.dumps(data, indent=2) + "\n")
        (stage / md.name).write_text(render_markdown(data, links))
        for f in stage.iterdir():
            os.replace(f, md.parent / f.name)  # all-or-nothing up to here
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("report written: %s", md)
    return ReportFiles(md, md.parent / names["json"], md.parent / names["png"] if draw else None,
                       md.parent / names["dot"], md.parent / names["svg"] if rendered else None)


def _render_dot(src: Path, dst: Path) -> bool:
    """Render DOT to SVG with Graphviz if ``dot`` is on PATH; the DOT text stays either way."""
    exe = shutil.which("dot")
    if exe is None:
        log.info("graphviz 'dot' not on PATH: the group diagram stays a .dot file")
        return False
    try:
        subprocess.run([exe, "-Tsvg", str(src), "-o", str(dst)], check=True, capture_output=True, timeout=120)
        return True
    except (subprocess.SubprocessError, OSError) as e:
        log.warning("graphviz failed to render %s: %s", src.name, e)
        return False
