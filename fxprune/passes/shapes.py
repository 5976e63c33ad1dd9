"""Shape propagation: run the graph once on example inputs and record the shape of every tensor value."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import ShapeError

Shape = tuple[int, ...]


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, Shape] = {}
        self.failed_at: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception:
            self.failed_at = n
            raise
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
            n.meta["fxprune_shape"] = tuple(out.shape)
        elif isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
            for i, t in enumerate(out):
                self.shapes[f"{n.name}#{i}"] = tuple(t.shape)
        return out


def record_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> tuple[dict[str, Shape], Any]:
    """Run ``gm`` in eval mode without gradients and return (shape per value name, the output).

    Tuple outputs of a node are recorded as ``name#0``, ``name#1``, ...

    Raises:
        ShapeError: the graph does not run on these inputs; the message names the failing node.
    """
    was_training = gm.training
    gm.eval()
    rec = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            out = rec.run(*example_inputs)
    except Exception as e:
        where = rec.failed_at.format_node() if rec.failed_at is not None else "?"
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise ShapeError(
            f"the model does not run on example inputs of shape {shapes}: {type(e).__name__}: {e} "
            f"(at node {where}). Pass example_inputs that the model accepts."
        ) from e
    finally:
        gm.train(was_training)
    return rec.shapes, out


def synthesize_inputs(gm: fx.GraphModule, spatial: int) -> tuple[torch.Tensor, ...] | None:
    """Guess example inputs from the first layer each placeholder feeds (conv, linear or embedding).

    Returns None when some placeholder's first consumer says nothing about its shape.
    """
    inputs: list[torch.Tensor] = []
    for ph in gm.graph.nodes:
        if ph.op != "placeholder":
            continue
        guess = None
        for user in ph.users:
            if user.op != "call_module":
                continue
            m = gm.get_submodule(str(user.target))
            if isinstance(m, nn.modules.conv._ConvNd):
                guess = torch.randn(1, m.in_channels, *([spatial] * len(m.kernel_size)))
            elif isinstance(m, nn.Linear):
                guess = torch.randn(1, m.in_features)
            elif isinstance(m, nn.Embedding):
                guess = torch.randint(0, m.num_embeddings, (1, 8))
            if guess is not None:
                break
        if guess is None:
            return None
        inputs.append(guess)
    return tuple(inputs)


def shapes_for(gm: fx.GraphModule, example_inputs: tuple[Any, ...] | None) -> tuple[dict[str, Shape], tuple[Any, ...]]:
    """Record shapes with the given inputs, or with synthesized ones when none were given.

    Raises:
        ShapeError: no inputs were given and none could be synthesized that the model accepts.
    """
    if example_inputs is not None:
        return record_shapes(gm, example_inputs)[0], example_inputs
    last: ShapeError | None = None
    for spatial in (64, 224):
        guess = synthesize_inputs(gm, spatial)
        if guess is None:
            break
        try:
            return record_shapes(gm, guess)[0], guess
        except ShapeError as e:
            last = e
    raise ShapeError(
        "this model needs example_inputs: fxprune could not infer input shapes"
        + (f" (a synthesized input failed: {last})" if last else "")
        + ". Call fxprune.compile(model, example_inputs=(torch.randn(...),))."
    )
