"""Draw the channel-dependency graph of a model (the figure in docs/how-it-works.md shows a small block).

    .venv/bin/python examples/draw_dependency_graph.py docs/figures/dependency_graph.png
    .venv/bin/python examples/draw_dependency_graph.py resnet18.png torchvision:resnet18

The layout is layered: one row per activation's channel space, in execution order, with the parameter
dims coupled to it beside it, so no two nodes overlap however large the model. Couplings between grid
neighbours are straight lines, the others (residual adds, concat offsets) arcs.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Hashable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import torch
import torch.nn as nn

from fxprune.depgraph import space_label
from fxprune.passes.dependency import build_dependencies
from fxprune.passes.shapes import record_shapes
from fxprune.passes.trace import trace

Space = tuple[str, int]
# matplotlib's tab20 without its greys (grey means pinned here), dark shades first: 18 group colours.
_DARK = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
_LIGHT = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
GROUP_COLORS = _DARK + _LIGHT
PINNED, FREE = "#bbbbbb", "#eeeeee"


class Block(nn.Module):
    """conv a -> bn -> relu; conv b added back (residual); concat with conv c; conv out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.c, self.out = nn.Conv2d(3, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.b(y)
        return self.out(torch.cat([y, self.c(x)], 1))


def channel_graph(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[nx.Graph, dict[Space, int]]:
    """The channel spaces of ``model`` (dim 1 of activations, dims 0/1 of weights) and their couplings.

    Returns:
        A simple graph (an edge is ``mapped`` when a coupling has an explicit index map, e.g. concat
        offsets; a node's ``color`` is its coupled group, grey when pinned) and the row of every space:
        an activation's is the position of its traced node in execution order; a parameter dim shares the
        row of the first activation it is coupled to (a conv's ``weight[1]`` that of its input), else of
        the first parameter dim it is coupled to (a bias: its weight's).
    """
    gm, _ = trace(model.eval())
    shapes, _ = record_shapes(gm, example_inputs)
    deps = build_dependencies(gm, shapes)
    sol, multi = deps.solution, deps.couplings.graph
    keep = [s for s in multi.nodes if (s[0].startswith("param:") and s[1] <= 1) or s[1] == 1]
    g = nx.Graph()
    for s in keep:
        groups = {int(x) for x in sol.class_group[sol.space_labels(s)] if x >= 0}
        pinned = all(sol.class_pin[c] for c in sol.space_labels(s))
        g.add_node(s, color=PINNED if pinned else GROUP_COLORS[min(groups) % len(GROUP_COLORS)] if groups else FREE)
    for a, b, d in multi.subgraph(keep).edges(data=True):
        mapped = d["a_index"] is not None or g.get_edge_data(a, b, {}).get("mapped", False)
        g.add_edge(a, b, mapped=mapped)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    rows = {s: order.get(s[0], len(order)) for s in g.nodes if not s[0].startswith("param:")}
    pending = [s for s in g.nodes if s not in rows]
    while pending:  # parameters: beside a coupled activation, else beside a placed coupled parameter
        placed = {s: min(rows[t] for t in g.neighbors(s) if t in rows) for s in pending
                  if any(t in rows for t in g.neighbors(s))}
        if not placed:
            placed = {s: len(order) for s in pending}
        rows.update(placed)
        pending = [s for s in pending if s not in placed]
    dense = {r: i for i, r in enumerate(sorted(set(rows.values())))}
    return g, {s: dense[r] for s, r in rows.items()}


def layered_layout(g: nx.Graph, rows: dict[Space, int], dx: float = 1.0, dy: float = 1.0) -> dict[Hashable, Any]:
    """Positions on a grid: row ``rows[s]`` from the top; in a row the activation space comes first
    (column 0), then the parameter spaces depth-first from it (a bias beside its weight). No two nodes
    share a point."""
    by_row: dict[int, list[Space]] = {}
    rank = {s: i for i, s in enumerate(g.nodes)}
    for s in g.nodes:
        by_row.setdefault(rows[s], []).append(s)
    pos: dict[Hashable, Any] = {}
    for r, members in by_row.items():
        sub = g.subgraph(members)
        roots = sorted(members, key=lambda s: (s[0].startswith("param:"), rank[s]))
        ordered: list[Space] = []
        for root in roots:
            walk = nx.dfs_preorder_nodes(sub, root, sort_neighbors=lambda it: sorted(it, key=rank.__getitem__))
            ordered += [s for s in walk if s not in ordered]
        for col, s in enumerate(ordered):
            pos[s] = (col * dx, -r * dy)
    return pos


def draw(g: nx.Graph, rows: dict[Space, int], title: str = "") -> plt.Figure:
    """The figure of a :func:`channel_graph` in the layered layout (node size and fonts shrink past 12 rows)."""
    pos = layered_layout(g, rows)
    n_rows, n_cols = max(rows.values()) + 1, max(round(x) for x, _ in pos.values()) + 1
    small = n_rows <= 12
    font, size = (8.0, 260) if small else (6.5, 70)
    label_in = max(len(space_label(s)) for s in g.nodes) * 0.55 * font / 72 + 0.3  # a column: node and label
    fig, ax = plt.subplots(figsize=(label_in * n_cols + 1.0, (0.42 if small else 0.26) * n_rows + 1.3),
                           layout="constrained")
    col, row = {s: round(x) for s, (x, _) in pos.items()}, rows
    # Within a row every space is coupled to the row's activation: straight lines (a bus behind the nodes).
    # Between rows, neighbours on the activation spine are straight too; the rest (skips) arc to the left.
    straight = [(a, b) for a, b in g.edges if row[a] == row[b] or (col[a] == col[b] == 0 and abs(row[a] - row[b]) == 1)]
    arcs = [(a, b) if row[a] < row[b] else (b, a) for a, b in g.edges if (a, b) not in set(straight)]
    for edges, style in ((straight, {}),
                         (arcs, {"arrows": True, "arrowstyle": "-", "connectionstyle": "arc3,rad=0.25"})):
        for mapped in (False, True):
            look = ({"style": "dashed", "edge_color": "C3", "width": 1.8} if mapped
                    else {"edge_color": "#888888", "width": 0.8, "alpha": 0.7})
            nx.draw_networkx_edges(g, pos, edgelist=[e for e in edges if g.edges[e]["mapped"] == mapped], ax=ax,
                                   node_size=size, **style, **look)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=[g.nodes[s]["color"] for s in g.nodes], node_size=size,
                           edgecolors="#555555", linewidths=0.5)
    for s, xy in pos.items():
        ax.annotate(space_label(s), xy, xytext=(size**0.5 / 2 + 2, 0), textcoords="offset points", va="center",
                    fontsize=font, zorder=5, bbox={"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none",
                                                   "alpha": 0.8})
    ax.set_xlim(-0.45, n_cols - 0.05)
    ax.set_ylim(-(n_rows - 0.4), 0.6)
    caption = ("Channel spaces (nodes) and couplings (edges; dashed red = explicit index map, e.g. concat "
               "offsets). One row per activation, in execution order, with the parameter dims coupled to it. "
               "Colour = coupled group; grey = pinned (model input/output).")
    width = int(fig.get_figwidth() * 72 / (0.52 * 9))  # characters of 9 pt text across the figure
    ax.set_title((title + "\n" if title else "") + textwrap.fill(caption, width), fontsize=9)
    ax.axis("off")
    return fig


def main(argv: list[str]) -> None:
    """``draw_dependency_graph.py OUT.png [MODEL]``: MODEL as the CLI takes it (default: :class:`Block`)."""
    path = argv[0] if argv else "dependency_graph.png"
    if len(argv) > 1:
        from fxprune.model_loader import DEFAULT_INPUT_SHAPE, load_model, random_inputs

        loaded = load_model(argv[1])
        model, inputs, title = loaded.model, random_inputs(loaded.input_shapes or (DEFAULT_INPUT_SHAPE,)), argv[1]
    else:
        model, inputs, title = Block(), (torch.randn(1, 3, 8, 8),), ""
    fig = draw(*channel_graph(model, inputs), title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
