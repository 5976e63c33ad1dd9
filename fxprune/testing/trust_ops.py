"""Fuzz ops for the classes of silent miscompilation: what tracing or a channel rule can get wrong.

- ``inplace``: ``x += y`` on a value that other names still refer to (eager mutates every alias);
- ``dropout``: ``F.dropout(x, p, self.training)`` (or ``getattr``, or any submodule's flag), train-mode behaviour an eval trace bakes away;
- ``hooked``: a 1x1 conv whose forward hook reverses its channels (the conv rule no longer describes it);
- ``fconv``: ``F.conv2d`` with the module's own weight and bias parameters;
- ``tied``: two 1x1 convs sharing one weight (a tie that must stay a tie);
- ``cl_norm``: LayerNorm or RMSNorm over the channels (channels-last), pruned and proven exactly;
- ``tied_opaque``: a 1x1 conv tied to the conv inside an untraceable (opaque) submodule: the shared weight
  must stay whole, since the opaque forward reads it whole;
- ``state``: a buffer updated in forward from zero (an average, a counter, a copy), read into the output;
  a graph that loses the update is refused by the eager check, one that keeps it must stay exact over calls;
- ``func_module``: a stateless module object called like a function, not a submodule (transformers' hub
  kernels), traced inline;
- ``opaque_mlp``: an untraceable module with prunable insides, called with a ``None`` argument (its parts
  must receive the calibration batches);
- ``gqa``: grouped-query attention, inside the kernel (``enable_gqa=True``) or with the keys and values
  repeated (transformers' ``repeat_kv``: an expand and a reshape), whose key/value heads must go with their
  query heads (or, with ``prune_heads="query"``, stay while the same query heads go from each group);
- ``spatial_split``: a split of a spatial dim with sizes read from the tensor (``x.shape[2] // 2``), put back
  in the other order: those sizes must stay computed, or the model breaks at other input sizes.

Each emitter has the signature of ``netspec.EMITTERS``' entries: ``(step, input shapes) -> Emitted``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fxprune.testing.invalid import need

Shape = tuple[int, ...]
Emitted = tuple[dict[str, Shape], list[str], list[str]]

# Producers whose result is a fresh tensor (never a view of an input): an in-place op on them is safe to draw.
FRESH_PRODUCERS = frozenset({"conv", "conv_transpose", "bn", "binary", "cat", "linear", "se", "fconv", "tied",
                             "tied_opaque"})


_need = need


def emit_inplace(st: Any, xs: list[Shape]) -> Emitted:
    """``a += b`` / ``a *= b`` on equal shapes; the step's value is ``a`` itself (mutated)."""
    a, b = xs
    _need(a == b and st.ins[0] != st.ins[1], f"in-place operands differ: {a} vs {b}")
    _need(not st.ins[0].startswith("x"), "never mutate an input")
    op = {"add": "+=", "mul": "*="}[st.attrs["fn"]]
    return {st.name: a}, [], [f"{st.ins[0]} {op} {st.ins[1]}", f"{st.name} = {st.ins[0]}"]


_TRAINING_READS = {"attr": "self.training", "getattr": 'getattr(self, "training")',
                   "modules": "any(m.training for m in self.modules())"}


def emit_dropout(st: Any, xs: list[Shape]) -> Emitted:
    """Functional dropout that follows the module's training flag, read as an attribute, with ``getattr``,
    or over every submodule (the ways the eval trace's watch on mode reads must see: ``fast.training_reads``)."""
    flag = _TRAINING_READS[str(st.attrs.get("read", "attr"))]
    return {st.name: xs[0]}, [], [f"{st.name} = F.dropout({st.ins[0]}, {st.attrs['p']}, {flag})"]


def emit_hooked(st: Any, xs: list[Shape]) -> Emitted:
    """A 1x1 conv with a forward hook that reverses the output channels."""
    _need(len(xs[0]) == 4, "hooked conv needs NCHW")
    c = xs[0][1]
    init = [f"self.{st.name} = nn.Conv2d({c}, {c}, 1)",
            f"self.{st.name}.register_forward_hook(lambda mod, args, out: out.flip(1))"]
    return {st.name: xs[0]}, init, [f"{st.name} = self.{st.name}({st.ins[0]})"]


def emit_fconv(st: Any, xs: list[Shape]) -> Emitted:
    """``F.conv2d`` with parameters of the module (kernel 1 or 3, 'same' padding)."""
    _need(len(xs[0]) == 4, "F.conv2d needs NCHW")
    n, c, h, w = xs[0]
    out, k = st.attrs["out"], st.attrs["k"]
    init = [f"self.{st.name}_w = nn.Parameter(torch.randn({out}, {c}, {k}, {k}) * {(1.0 / (c * k * k)) ** 0.5:.4f})"]
    bias = "None"
    if st.attrs["bias"]:
        init.append(f"self.{st.name}_b = nn.Parameter(torch.randn({out}) * 0.1)")
        bias = f"self.{st.name}_b"
    expr = f"F.conv2d({st.ins[0]}, self.{st.name}_w, {bias}, 1, {k // 2})"
    return {st.name: (n, out, h, w)}, init, [f"{st.name} = {expr}"]


def emit_tied(st: Any, xs: list[Shape], opaque: bool = False) -> Emitted:
    """Two 1x1 convs C -> C whose weights are one Parameter; with ``opaque`` the first sits inside an
    ``OpaqueConv`` (an untraceable submodule)."""
    _need(len(xs[0]) == 4, "tied convs need NCHW")
    c = xs[0][1]
    first, weight = (f"OpaqueConv({c})", f"self.{st.name}_a.conv.weight") if opaque else (
        f"nn.Conv2d({c}, {c}, 1)", f"self.{st.name}_a.weight")
    init = [f"self.{st.name}_a = {first}", f"self.{st.name}_b = nn.Conv2d({c}, {c}, 1)",
            f"self.{st.name}_b.weight = {weight}"]
    return {st.name: xs[0]}, init, [f"{st.name} = self.{st.name}_b(F.relu(self.{st.name}_a({st.ins[0]})))"]


def emit_cl_norm(st: Any, xs: list[Shape]) -> Emitted:
    """LayerNorm (module or function) or RMSNorm over the channels of an NCHW value, through channels-last."""
    _need(len(xs[0]) == 4, "channel norm needs NCHW")
    c = xs[0][1]
    x = st.ins[0]
    kind = st.attrs["kind"]
    if kind == "ln_module":
        init = [f"self.{st.name} = nn.LayerNorm({c})"]
        expr = f"self.{st.name}({x}.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()"
    elif kind == "rms_module":
        init = [f"self.{st.name} = nn.RMSNorm({c})"]
        expr = f"self.{st.name}({x}.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()"
    else:
        init = [f"self.{st.name}_g = nn.Parameter(torch.rand({c}) + 0.5)"]
        fn = "F.layer_norm" if kind == "ln_fn" else "F.rms_norm"
        expr = f"{fn}({x}.permute(0, 2, 3, 1), ({c},), self.{st.name}_g).permute(0, 3, 1, 2).contiguous()"
    return {st.name: xs[0]}, init, [f"{st.name} = {expr}"]


class OpaqueConv(nn.Module):
    """A 1x1 conv behind a data-dependent branch: fx cannot trace it, so it becomes an opaque leaf."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e30:  # never true; only eager Python can decide it
            x = -x
        return self.conv(x)


class OpaqueMLP(nn.Module):
    """Two 1x1 convs (C -> 2C -> C) behind a data-dependent branch, called with a ``None`` argument: an opaque
    part whose inside is pruned piecewise, where calibration batches must still arrive (a recorded ``None``
    argument once made every batch look like another call)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.sum() > 1e30:  # never true; only eager Python can decide it
            x = -x
        if mask is not None:
            x = x * mask
        return self.b(torch.relu(self.a(x)))


def emit_opaque_mlp(st: Any, xs: list[Shape]) -> Emitted:
    """``OpaqueMLP(c)`` called as ``self.v(x, None)``."""
    _need(len(xs[0]) == 4, "the opaque MLP takes NCHW")
    return {st.name: xs[0]}, [f"self.{st.name} = OpaqueMLP({xs[0][1]})"], [f"{st.name} = self.{st.name}({st.ins[0]}, None)"]


def emit_tied_opaque(st: Any, xs: list[Shape]) -> Emitted:
    """A conv outside sharing its weight with the conv inside an opaque ``OpaqueConv``."""
    return emit_tied(st, xs, opaque=True)


def emit_spatial_split(st: Any, xs: list[Shape]) -> Emitted:
    """Swap the two halves of the height dim, with split sizes computed from the tensor's own shape."""
    _need(len(xs[0]) == 4 and xs[0][2] >= 2, "spatial split needs NCHW with height >= 2")
    x = st.ins[0]
    lines = [f"{st.name}_a, {st.name}_b = torch.split({x}, [{x}.shape[2] // 2, {x}.shape[2] - {x}.shape[2] // 2], "
             "dim=2)", f"{st.name} = torch.cat([{st.name}_b, {st.name}_a], dim=2)"]
    return {st.name: xs[0]}, [], lines


def emit_state(st: Any, xs: list[Shape]) -> Emitted:
    """A buffer the forward updates, starting at zero, and reads back into the output: an average updated
    with ``mul_`` then ``add_`` (``ema``), a counter (``count``: ``add_(1)``, no traced input, so fx runs it at
    trace time), or a copy of the batch mean (``copy``: every write takes a traced value). The first two
    leave a graph that misses the update: the eager check compares the state a call leaves and refuses it."""
    _need(len(xs[0]) == 4, "a per-channel state needs NCHW")
    c, x, kind = xs[0][1], st.ins[0], st.attrs["kind"]
    buf = f"self.{st.name}_s"
    init = [f"self.register_buffer('{st.name}_s', torch.zeros({c}))"]
    if kind == "ema":
        update = f"{buf}.mul_(0.9).add_({x}.mean((0, 2, 3)), alpha=0.1)"
    elif kind == "count":
        update = f"{buf}.add_(1.0)"
    else:
        update = f"{buf}.copy_({x}.mean((0, 2, 3)))"
    return {st.name: xs[0]}, init, [update, f"{st.name} = {x} + {buf}.view(1, {c}, 1, 1)"]


class _FunctionModule(nn.Module):
    """A stateless module object that stands for a function and is no model's submodule: transformers >= 5.25
    wraps ``apply_rotary_pos_emb`` so when ``kernels`` is installed (fx refused to call it: not installed as a
    submodule)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


QUICK_GELU = _FunctionModule()


def emit_func_module(st: Any, xs: list[Shape]) -> Emitted:
    """``QUICK_GELU(x)``: a call of the module-level ``_FunctionModule`` (traced inline, channels pass)."""
    return {st.name: xs[0]}, [], [f"{st.name} = QUICK_GELU({st.ins[0]})"]


def emit_gqa(st: Any, xs: list[Shape]) -> Emitted:
    """Grouped-query attention over the pixels: ``rep`` query heads per key/value head, added back to ``x``.
    With the kernel's own grouping (``enable_gqa=True``) query head h reads key/value head h // rep, and no
    ``repeat_kv`` in the graph says so; with ``repeat`` the keys and values are copied as transformers'
    ``repeat_kv`` does (an expand and a reshape), then plain attention."""
    _need(len(xs[0]) == 4, "attention over pixels needs NCHW")
    c = xs[0][1]
    n, hk, rep, d = st.name, st.attrs["kv"], st.attrs["rep"], st.attrs["d"]
    hq = hk * rep
    init = [f"self.{n}_q = nn.Linear({c}, {hq * d})", f"self.{n}_k = nn.Linear({c}, {hk * d})",
            f"self.{n}_v = nn.Linear({c}, {hk * d})", f"self.{n}_o = nn.Linear({hq * d}, {c})"]
    x = st.ins[0]
    fwd = [f"{n}_t = {x}.flatten(2).transpose(1, 2)",
           *(f"{n}_{p} = self.{n}_{p}({n}_t).view(*{n}_t.shape[:2], -1, {d}).transpose(1, 2)"  # as transformers
             for p in ("q", "k", "v"))]
    if st.attrs.get("repeat"):  # transformers' repeat_kv: each key/value head copied rep times, then plain attention
        fwd += [f"{n}_{p} = {n}_{p}[:, :, None].expand({n}_{p}.shape[0], {hk}, {rep}, {n}_{p}.shape[2], {d})"
                f".reshape({n}_{p}.shape[0], {hq}, {n}_{p}.shape[2], {d})" for p in ("k", "v")]
        fwd.append(f"{n}_a = F.scaled_dot_product_attention({n}_q, {n}_k, {n}_v)")
    else:
        fwd.append(f"{n}_a = F.scaled_dot_product_attention({n}_q, {n}_k, {n}_v, enable_gqa=True)")
    fwd += [f"{n} = {x} + self.{n}_o({n}_a.transpose(1, 2).flatten(2)).transpose(1, 2).reshape({x}.shape)"]
    return {n: xs[0]}, init, fwd


STATE_REFUSAL = "the forward updates"  # the eager check's words for a lost state update (passes/eager_check)

TRUST_EMITTERS = {"gqa": emit_gqa, "state": emit_state, "func_module": emit_func_module, "opaque_mlp": emit_opaque_mlp, "inplace": emit_inplace, "dropout": emit_dropout, "hooked": emit_hooked, "fconv": emit_fconv,
                  "tied": emit_tied, "cl_norm": emit_cl_norm, "spatial_split": emit_spatial_split,
                  "tied_opaque": emit_tied_opaque}
