"""Draw the channel-dependency graph of a small residual+concat block (the figure in docs/how-it-works.md).

    .venv/bin/python examples/draw_dependency_graph.py docs/figures/dependency_graph.png
"""

from __future__ import annotations

import sys

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


class Block(nn.Module):
    """conv a -> bn -> relu; conv b added back (residual); concat with conv c; conv out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.c, self.out = nn.Conv2d(3, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.b(y)
        return self.out(torch.cat([y, self.c(x)], 1))


def main(path: str) -> None:
    gm, _ = trace(Block().eval())
    shapes, _ = record_shapes(gm, (torch.randn(1, 3, 8, 8),))
    deps = build_dependencies(gm, shapes)
    sol = deps.solution
    # Channel dims only (dim 1 of activations, dims 0/1 of weights): spatial and batch dims clutter the picture.
    keep = [s for s in deps.dep.graph.nodes if (s[0].startswith("param:") and s[1] <= 1) or s[1] == 1]
    g = deps.dep.graph.subgraph(keep)
    colors = []
    for s in g.nodes:
        groups = {int(x) for x in sol.class_group[sol.space_labels(s)] if x >= 0}
        pinned = all(sol.class_pin[c] for c in sol.space_labels(s))
        colors.append("#bbbbbb" if pinned else f"C{min(groups) % 10}" if groups else "#eeeeee")
    fig, ax = plt.subplots(figsize=(11, 7))
    pos = nx.kamada_kawai_layout(g)
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.5)
    mapped = [(a, b) for a, b, d in g.edges(data=True) if d["a_index"] is not None]
    nx.draw_networkx_edges(g, pos, edgelist=mapped, ax=ax, style="dashed", edge_color="C3", width=2)
    nx.draw_networkx_nodes(g, pos, node_color=colors, node_size=900, ax=ax)
    nx.draw_networkx_labels(g, pos, {s: space_label(s) for s in g.nodes}, font_size=7, ax=ax)
    ax.set_title("Channel spaces (nodes) and couplings (edges; dashed = explicit index map, e.g. concat offsets).\n"
                 "Colour = coupled group; grey = pinned (model input/output).", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dependency_graph.png")
