"""Shape propagation: run the graph once on example inputs and record the shape of every tensor value.

The run is first tried on the meta device (parameters, buffers and inputs replaced by storage-free meta
tensors: the same shape functions, no arithmetic). Anything meta cannot decide exactly falls back to a real
run on the example inputs: an op without a meta kernel, a value-dependent branch or shape, a tensor the
forward creates on the CPU, or inputs whose dtypes disagree with a layer's parameters (meta kernels do not
check dtypes; the real run then gives the error the user would see). Graphs that call a module of the user's
own (an opaque leaf) always run for real: its forward may cache tensors (anchors, masks) on the module, and a
cached meta tensor would poison every later run. Registered leaves (known composites such as timm's BatchNormAct2d, or module types given a rule
with ``rules.register``) are not opaque: their forwards were read and must cache nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.func as func
import torch.fx as fx
import torch.nn as nn

from fxprune import fast
from fxprune.errors import ShapeError
from fxprune.passes.base import submodule
from fxprune.rules.modules import SHAPE_KEEPING_MODULES
from fxprune.rules.registry import has_trait, is_leaf

Shape = tuple[int, ...]


class _NotOnMeta(Exception):
    """The meta run cannot stand in for a real one at this node."""


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, meta: bool = False) -> None:
        super().__init__(gm)
        self.shapes: dict[str, Shape] = {}
        self.failed_at: fx.Node | None = None
        self.meta = meta

    def fetch_attr(self, target: str) -> Any:
        """Submodules from the Interpreter's own table (``functional_call`` swaps tensors, never modules)."""
        mod = self.submodules.get(target)
        return mod if mod is not None else super().fetch_attr(target)

    def _guard(self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise ``_NotOnMeta`` where a real kernel would reject dtypes that a meta kernel accepts."""
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if n.op == "call_module":
            mod = self.fetch_attr(str(n.target))
            if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                return
            tensors += [t for t in mod._parameters.values() if t is not None]
        elif n.op != "call_function" or not has_trait(n, "contraction"):
            return
        if len({t.dtype for t in tensors}) > 1:
            raise _NotOnMeta(n.format_node())

    def _run_on_meta(self, n: fx.Node) -> Any:
        """``Interpreter.run_node`` for a call on meta, with the shape shortcuts, and without recording the
        node as the current one for tracebacks (two context managers per node, a large share of a meta run
        whose kernels are shortcut; a failure is reported through ``failed_at`` instead)."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._guard(n, args, kwargs)
        out = self._same_shape(n, args, kwargs) if fast.ENABLED else None
        if out is None:
            mod = self.fetch_attr(str(n.target)) if n.op == "call_module" else None
            out = fast.meta_shape(n.op, n.target, args, kwargs, mod)
        if out is None:
            out = getattr(self, n.op)(n.target, args, kwargs)
        return out

    def _same_shape(self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """On meta, the output of an eval-mode module that keeps its input's shape is the input itself.

        Meta batch norm is a Python decomposition (~1 ms a call); checking its channel count is enough. The
        same holds for ``F.batch_norm`` called in a forward (timm's BatchNormAct2d).
        """
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        mod = self.fetch_attr(str(n.target)) if n.op == "call_module" else None
        norm = _layer_norm_shape(n, args, kwargs, mod)
        if norm is not None:  # meta layer norm is a Python decomposition too (~1.2 ms a call)
            if tuple(x.shape[len(x.shape) - len(norm):]) != norm:
                raise _NotOnMeta(n.format_node())  # the real run names the mismatch
            return x
        if n.op == "call_function" and has_trait(n, "batch_norm"):
            stats: list[Any] = [*args[1:], *kwargs.values()]
        elif n.op == "call_module" and len(args) == 1:
            if type(mod) not in SHAPE_KEEPING_MODULES and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                return None
            stats = [*mod._parameters.values(), *mod._buffers.values()]
        else:
            return None
        for t in stats:
            if isinstance(t, torch.Tensor) and t.dim() == 1 and (x.dim() < 2 or t.shape[0] != x.shape[1]):
                raise _NotOnMeta(n.format_node())  # the real run names the mismatch
        return x

    def run_node(self, n: fx.Node) -> Any:
        try:
            if self.meta and n.op in ("call_module", "call_function", "call_method"):
                out = self._run_on_meta(n)
            else:
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


def _layer_norm_shape(n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], mod: Any) -> tuple[int, ...] | None:
    """The normalised shape of an eval-mode layer norm call (module or function) whose weight and bias fit it;
    None for anything else."""
    if n.op == "call_module" and type(mod) is nn.LayerNorm and len(args) == 1 and not kwargs:
        shape, tensors = tuple(mod.normalized_shape), [mod.weight, mod.bias]
    elif n.op == "call_function" and has_trait(n, "layer_norm") and len(args) >= 2:
        shape = tuple(args[1]) if isinstance(args[1], (list, tuple, torch.Size)) else (args[1],)
        tensors = [*args[2:4], kwargs.get("weight"), kwargs.get("bias")]
    else:
        return None
    if not all(isinstance(d, int) for d in shape):
        return None
    if any(isinstance(t, torch.Tensor) and tuple(t.shape) != shape for t in tensors):
        return None
    return shape


class _OnMeta(nn.Module):
    """Runs the recorder inside ``functional_call``, which swaps in meta parameters and buffers."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.rec = _ShapeRecorder(gm, meta=True)

    def forward(self, *inputs: Any) -> Any:
        return self.rec.run(*inputs)


def _meta_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> dict[str, Shape] | None:
    """Shapes from a meta run, or None when meta cannot stand in for the real run."""
    if not all(isinstance(t, torch.Tensor) for t in example_inputs) or any(t.is_meta for t in example_inputs):
        return None
    for n in gm.graph.nodes:
        mod = submodule(gm, str(n.target)) if n.op == "call_module" else None
        if mod is not None and not type(mod).__module__.startswith("torch.nn.") and not is_leaf(mod):
            return None  # a forward of the user's own: it may cache what it computes
    runner = _OnMeta(gm)
    try:
        state = {}
        for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            state[f"gm.{name}"] = torch.empty_like(t, device="meta")
        with torch.no_grad():
            func.functional_call(runner, state, tuple(t.to("meta") for t in example_inputs), tie_weights=False)
    except Exception:  # anything meta cannot decide: the real run decides (and names the error)
        return None
    return runner.rec.shapes


def record_shapes(
    gm: fx.GraphModule, example_inputs: tuple[Any, ...], *, meta: bool = False
) -> tuple[dict[str, Shape], Any]:
    """Run ``gm`` in eval mode without gradients and return (shape per value name, the output).

    Tuple outputs of a node are recorded as ``name#0``, ``name#1``, ...

    Args:
        gm: the graph.
        example_inputs: its inputs.
        meta: try a storage-free meta run first (see the module docstring); the output is then None.

    Raises:
        ShapeError: the graph does not run on these inputs; the message names the failing node.
    """
    training = [m for m in gm.modules() if m.training]  # run in eval mode, then restore exactly these
    for m in training:
        m.training = False
    try:
        return _record(gm, example_inputs, meta)
    finally:
        for m in training:
            m.training = True


def _record(gm: fx.GraphModule, example_inputs: tuple[Any, ...], meta: bool) -> tuple[dict[str, Shape], Any]:
    if meta:
        shapes = _meta_shapes(gm, example_inputs)
        if shapes is not None:
            for n in gm.graph.nodes:
                if n.name in shapes:
                    n.meta["fxprune_shape"] = shapes[n.name]
            gm.meta.setdefault("fxprune_real_shape_run", False)
            return shapes, None
    gm.meta["fxprune_real_shape_run"] = True  # the modules run on real tensors (stages undoes what they write)
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
            m = submodule(gm, str(user.target))
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
        return record_shapes(gm, example_inputs, meta=True)[0], example_inputs
    last: ShapeError | None = None
    for spatial in (64, 224):
        guess = synthesize_inputs(gm, spatial)
        if guess is None:
            break
        try:
            return record_shapes(gm, guess, meta=True)[0], guess
        except ShapeError as e:
            last = e
    raise ShapeError(
        "this model needs example_inputs: fxprune could not infer input shapes"
        + (f" (a synthesized input failed: {last})" if last else "")
        + ". Call fxprune.compile(model, example_inputs=(torch.randn(...),))."
    )
