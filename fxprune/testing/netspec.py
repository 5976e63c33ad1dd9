"""Random-network specs for fuzzing: an op list, the Python source it stands for, and the module built from it.

A network is a ``NetSpec``: input shapes, a list of ``Step`` s (one op each, reading earlier values by
name) and the names it returns. ``to_source`` turns a spec into the source of a plain ``nn.Module`` whose
forward is straight-line code, so ``torch.fx.symbolic_trace`` captures every op; each line carries its
value's shape as a comment. A layer's input width is never stored: it follows from the shapes of its
inputs, so the shrinker can drop a step, rewire its readers to the step's input, and the rest still
builds whenever the shapes allow (otherwise ``InvalidNet`` says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.testing.invalid import need
from fxprune.testing.trust_ops import TRUST_EMITTERS

Shape = tuple[int, ...]
Emitted = tuple[dict[str, Shape], list[str], list[str]]  # (output shapes, __init__ lines, forward lines)

BATCH = 2
MAX_CHANNELS = 128
MAX_SPATIAL = 48
MAX_FEATURES = 4096
ACT_MODULES = {"relu": "nn.ReLU()", "silu": "nn.SiLU()", "gelu": "nn.GELU()", "hardswish": "nn.Hardswish()",
               "sigmoid": "nn.Sigmoid()"}
ACT_FUNCTIONS = {"relu": "F.relu", "silu": "F.silu", "gelu": "F.gelu", "hardswish": "F.hardswish",
                 "sigmoid": "torch.sigmoid"}


@dataclass(frozen=True)
class Step:
    """One op of a random network.

    Attributes:
        name: the value it defines (``v3``); ops with several results define ``v3_0``, ``v3_1``, ...
        op: key of ``EMITTERS``.
        ins: names of the values it reads (inputs are ``x0``, ``x1``, ...).
        attrs: op settings that do not follow from input shapes (output width, kernel, style, ...).
    """

    name: str
    op: str
    ins: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NetSpec:
    """A random network: input shapes (batch included), steps in order, and the values it returns."""

    seed: int
    inputs: tuple[Shape, ...]
    steps: tuple[Step, ...]
    outputs: tuple[str, ...]

    @property
    def literal_batch(self) -> bool:
        """Whether some reshape spells the batch size as a literal (the model then has a fixed batch)."""
        return any(st.attrs.get("batch") == "literal" for st in self.steps)


_need = need


def _rank(shape: Shape, rank: int, what: str) -> Shape:
    _need(len(shape) == rank, f"{what} needs a rank-{rank} input, got {shape}")
    return shape


def _spatial(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _module(st: Step, ctor: str, x: str, out: Shape, suffix: str = "") -> Emitted:
    attr = st.name + suffix
    return {st.name: out}, [f"self.{attr} = {ctor}"], [f"{st.name} = self.{attr}({x})"]


def _act_call(kind: str, style: str, x: str) -> str:
    if style == "method" and kind in ("relu", "sigmoid"):
        return f"{x}.{kind}()"
    return f"{ACT_FUNCTIONS[kind]}({x})"


def emit_conv(st: Step, xs: list[Shape]) -> Emitted:
    """Conv2d: dense, grouped (``groups``) or depthwise with a channel multiplier (``mult``)."""
    n, c, h, w = _rank(xs[0], 4, "conv")
    a = st.attrs
    groups = c if a["mode"] == "dw" else a.get("groups", 1)
    out = c * a["mult"] if a["mode"] == "dw" else a["out"]
    _need(c % groups == 0 and out % groups == 0, f"groups={groups} must divide {c} and {out}")
    k, s, d = a["k"], a["stride"], a["dilation"]
    p = d * (k - 1) // 2 if a["same"] else 0
    ctor = f"nn.Conv2d({c}, {out}, {k}, stride={s}, padding={p}, dilation={d}, groups={groups}, bias={a['bias']})"
    return _module(st, ctor, st.ins[0], (n, out, _spatial(h, k, s, p, d), _spatial(w, k, s, p, d)))


def emit_conv_transpose(st: Step, xs: list[Shape]) -> Emitted:
    """ConvTranspose2d (upsampling when strided)."""
    n, c, h, w = _rank(xs[0], 4, "conv_transpose")
    a = st.attrs
    k, s, p, op, g = a["k"], a["stride"], a["padding"], a["output_padding"], a.get("groups", 1)
    _need(c % g == 0 and a["out"] % g == 0 and op < s, "bad ConvTranspose2d settings")
    size = [(v - 1) * s - 2 * p + k + op for v in (h, w)]
    ctor = (f"nn.ConvTranspose2d({c}, {a['out']}, {k}, stride={s}, padding={p}, output_padding={op}, "
            f"groups={g}, bias={a['bias']})")
    return _module(st, ctor, st.ins[0], (n, a["out"], size[0], size[1]))


def emit_batch_norm(st: Step, xs: list[Shape]) -> Emitted:
    """BatchNorm2d on NCHW values, BatchNorm1d on (N, F) values."""
    x = xs[0]
    _need(len(x) in (2, 4), "BatchNorm needs rank 2 or 4")
    return _module(st, f"nn.BatchNorm{'2d' if len(x) == 4 else '1d'}({x[1]})", st.ins[0], x)


def emit_act(st: Step, xs: list[Shape]) -> Emitted:
    """An activation as a module, a function or a tensor method."""
    kind, style = st.attrs["kind"], st.attrs["style"]
    if style == "module":
        return _module(st, ACT_MODULES[kind], st.ins[0], xs[0])
    return {st.name: xs[0]}, [], [f"{st.name} = {_act_call(kind, style, st.ins[0])}"]


_BINARY = {"op": {"add": "{a} + {b}", "mul": "{a} * {b}"}, "torch": {"add": "torch.add({a}, {b})",
           "mul": "torch.mul({a}, {b})"}, "method": {"add": "{a}.add({b})", "mul": "{a}.mul({b})"}}


def emit_binary(st: Step, xs: list[Shape]) -> Emitted:
    """add/mul of equal shapes, or (``broadcast``) of NCHW with N x C x 1 x 1."""
    a, b = xs
    if st.attrs.get("broadcast"):
        _need(len(a) == len(b) == 4 and b[:2] == a[:2] and b[2:] == (1, 1), f"cannot broadcast {b} to {a}")
    else:
        _need(a == b, f"operands differ: {a} vs {b}")
    expr = _BINARY[st.attrs["style"]][st.attrs["fn"]].format(a=st.ins[0], b=st.ins[1])
    return {st.name: a}, [], [f"{st.name} = {expr}"]


def emit_cat(st: Step, xs: list[Shape]) -> Emitted:
    """torch.cat along the channel dim."""
    rest = [s[:1] + s[2:] for s in xs]
    _need(len(xs) >= 2 and all(len(s) == len(xs[0]) for s in xs) and len(set(rest)) == 1, f"cannot cat {xs}")
    out = xs[0][:1] + (sum(s[1] for s in xs),) + xs[0][2:]
    items = ", ".join(st.ins)
    expr = f"torch.cat([{items}], dim=1)" if st.attrs["style"] == "list" else f"torch.cat(({items}), 1)"
    return {st.name: out}, [], [f"{st.name} = {expr}"]


def split_sizes(c: int, attrs: dict[str, Any]) -> list[int]:
    """Section sizes of a split/chunk step on ``c`` channels (torch's own rules for int sizes and chunks)."""
    mode = attrs["mode"]
    if mode in ("sizes", "slice"):
        sizes = list(attrs["sizes"])
        _need(sum(sizes) == c and min(sizes) > 0, f"split sizes {sizes} do not add up to {c}")
        return sizes
    size = attrs["size"] if mode == "int" else -(-c // attrs["chunks"])
    _need(0 < size < c and (mode == "int" or attrs["chunks"] <= c), f"cannot {mode}-split {c} channels")
    return [size] * (c // size) + ([c % size] if c % size else [])


def emit_split(st: Step, xs: list[Shape]) -> Emitted:
    """torch.split / Tensor.split with sizes or an int, chunk, or ``x[:, a:b]`` per section (``slice``: a fused
    projection sliced, open at both ends, negative bounds with style ``neg``); defines ``<name>_<i>`` per section."""
    x = xs[0]
    _need(len(x) in (2, 4), "split needs rank 2 or 4")
    sizes = split_sizes(x[1], st.attrs)
    mode, c, src = st.attrs["mode"], x[1], st.ins[0]
    outs = {f"{st.name}_{i}": x[:1] + (s,) + x[2:] for i, s in enumerate(sizes)}
    if mode == "slice":
        ends, shift = [sum(sizes[: i + 1]) for i in range(len(sizes))], c if st.attrs["style"] == "neg" else 0
        return outs, [], [f"{v} = {src}[:, {'' if b == n else b - n - shift}:{'' if b == c else b - shift}]"
                          for v, n, b in zip(outs, sizes, ends, strict=True)]
    fn = "chunk" if mode == "chunk" else "split"
    arg = {"sizes": str(st.attrs.get("sizes")), "int": str(st.attrs.get("size")), "chunk": str(st.attrs.get("chunks"))}
    call = f"torch.{fn}({src}, {arg[mode]}, dim=1)" if st.attrs["style"] == "fn" else f"{src}.{fn}({arg[mode]}, 1)"
    return outs, [], [f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = {call}"]


def emit_se(st: Step, xs: list[Shape]) -> Emitted:
    """Squeeze-excitation gate: pool -> conv1x1 or linear -> act -> conv1x1 or linear -> gate -> mul."""
    n, c, h, w = _rank(xs[0], 4, "se")
    a, x, t, name = st.attrs, st.ins[0], f"{st.name}_t", st.name
    hidden, conv = a["hidden"], a["style"] == "conv"
    gate = "torch.sigmoid" if a["gate"] == "sigmoid" else "F.hardsigmoid"
    if conv:
        init = [f"self.{name}_fc1 = nn.Conv2d({c}, {hidden}, 1)", f"self.{name}_fc2 = nn.Conv2d({hidden}, {c}, 1)"]
        pool = f"F.adaptive_avg_pool2d({x}, 1)" if a["pool"] == "adaptive" else f"{x}.mean((2, 3), keepdim=True)"
    else:
        init = [f"self.{name}_fc1 = nn.Linear({c}, {hidden})", f"self.{name}_fc2 = nn.Linear({hidden}, {c})"]
        pool = f"F.adaptive_avg_pool2d({x}, 1).flatten(1)" if a["pool"] == "adaptive" else f"{x}.mean((2, 3))"
    fwd = [f"{t} = {pool}", f"{t} = {_act_call(a['act'], 'fn', f'self.{name}_fc1({t})')}",
           f"{t} = {gate}(self.{name}_fc2({t}))"]
    if not conv:
        expand = {"view": f"{t}.view({t}.size(0), {c}, 1, 1)", "index": f"{t}[:, :, None, None]",
                  "unsqueeze": f"{t}.unsqueeze(-1).unsqueeze(-1)"}
        fwd.append(f"{t} = {expand[a['expand']]}")
    return {name: (n, c, h, w)}, init, [*fwd, f"{name} = {x} * {t}"]


def emit_pool(st: Step, xs: list[Shape]) -> Emitted:
    """Max/avg pooling, or adaptive pooling to a fixed size, as a module or a function."""
    n, c, h, w = _rank(xs[0], 4, "pool")
    a, x = st.attrs, st.ins[0]
    kind = a["kind"]
    if kind in ("max", "avg"):
        k, s, p = a["k"], a["stride"], a["padding"]
        _need(p <= k // 2, "pool padding exceeds half the kernel")
        out = (n, c, _spatial(h, k, s, p), _spatial(w, k, s, p))
        mod, fn = f"{kind.capitalize()}Pool2d", f"F.{kind}_pool2d"
        args = f"{k}, stride={s}, padding={p}"
    else:
        oh, ow = a["size"]
        out = (n, c, oh, ow)
        mod, fn = f"Adaptive{kind[9:].capitalize()}Pool2d", f"F.{kind}_pool2d"
        args = f"({oh}, {ow})"
    if a["style"] == "module":
        return _module(st, f"nn.{mod}({args})", x, out)
    return {st.name: out}, [], [f"{st.name} = {fn}({x}, {args})"]


def emit_interpolate(st: Step, xs: list[Shape]) -> Emitted:
    """F.interpolate / nn.Upsample by a scale factor of 2 or to a size, nearest or bilinear."""
    n, c, h, w = _rank(xs[0], 4, "interpolate")
    a = st.attrs
    size = a.get("size")
    how = "scale_factor=2.0" if size is None else f"size=({size[0]}, {size[1]})"
    out = (n, c, 2 * h, 2 * w) if size is None else (n, c, size[0], size[1])
    extra = ", align_corners=False" if a["mode"] == "bilinear" else ""
    if a["style"] == "module":
        return _module(st, f"nn.Upsample({how}, mode={a['mode']!r}{extra})", st.ins[0], out)
    return {st.name: out}, [], [f"{st.name} = F.interpolate({st.ins[0]}, {how}, mode={a['mode']!r}{extra})"]


def emit_shuffle(st: Step, xs: list[Shape]) -> Emitted:
    """Channel shuffle: view(N, g, C/g, H, W) -> transpose(1, 2) -> view(N, C, H, W)."""
    n, c, h, w = _rank(xs[0], 4, "shuffle")
    g, x, t = st.attrs["groups"], st.ins[0], f"{st.name}_t"
    _need(g >= 2 and c % g == 0 and c > g, f"cannot shuffle {c} channels in {g} groups")
    literal = st.attrs["batch"] == "literal"
    b0, b1 = (str(BATCH), str(BATCH)) if literal else (f"{x}.size(0)", f"{t}.size(0)")
    back = -1 if st.attrs["back"] == "minus1" else c
    fwd = [f"{t} = {x}.view({b0}, {g}, {c // g}, {h}, {w})", f"{t} = torch.transpose({t}, 1, 2).contiguous()",
           f"{st.name} = {t}.view({b1}, {back}, {h}, {w})"]
    return {st.name: (n, c, h, w)}, [], fwd


def emit_channels_last_linear(st: Step, xs: list[Shape]) -> Emitted:
    """permute to N x H x W x C -> [LayerNorm] -> Linear -> [act] -> permute back."""
    n, c, h, w = _rank(xs[0], 4, "channels_last_linear")
    a, x, t, name = st.attrs, st.ins[0], f"{st.name}_t", st.name
    init = [f"self.{name} = nn.Linear({c}, {a['out']}, bias={a['bias']})"]
    first = f"torch.permute({x}, (0, 2, 3, 1))" if a["permute"] == "fn" else f"{x}.permute(0, 2, 3, 1)"
    fwd = [f"{t} = {first}"]
    if a["norm"]:
        init.append(f"self.{name}_ln = nn.LayerNorm({c})")
        fwd.append(f"{t} = self.{name}_ln({t})")
    fwd.append(f"{t} = self.{name}({t})")
    if a["act"]:
        fwd.append(f"{t} = {_act_call(a['act'], 'fn', t)}")
    fwd.append(f"{name} = {t}.permute(0, 3, 1, 2).contiguous()")  # so a later view() works
    return {name: (n, a["out"], h, w)}, init, fwd


_FLATTEN = {"torch": "torch.flatten({x}, 1)", "method": "{x}.flatten(1)", "view": "{x}.view({x}.size(0), -1)",
            "reshape": "{x}.reshape({batch}, -1)", "view_literal": "{x}.view({x}.size(0), {f})"}
_GAP = {"adaptive": "F.adaptive_avg_pool2d({x}, 1).flatten(1)", "mean": "{x}.mean((2, 3))"}
_UNFLATTEN = {"view": "{x}.view({x}.size(0), -1, 1, 1)", "index": "{x}[:, :, None, None]",
              "unsqueeze": "{x}.unsqueeze(-1).unsqueeze(-1)", "reshape": "{x}.reshape({batch}, {f}, 1, 1)"}


def emit_flatten(st: Step, xs: list[Shape]) -> Emitted:
    """NCHW -> (N, C*H*W) by torch.flatten, flatten(), view, reshape or nn.Flatten."""
    n, c, h, w = _rank(xs[0], 4, "flatten")
    out = (n, c * h * w)
    if st.attrs["style"] == "module":
        return _module(st, "nn.Flatten()", st.ins[0], out)
    expr = _FLATTEN[st.attrs["style"]].format(x=st.ins[0], batch=BATCH, f=c * h * w)
    return {st.name: out}, [], [f"{st.name} = {expr}"]


def emit_gap(st: Step, xs: list[Shape]) -> Emitted:
    """Global average pooling to (N, C)."""
    n, c, _, _ = _rank(xs[0], 4, "gap")
    if st.attrs["style"] == "module":
        return {st.name: (n, c)}, [f"self.{st.name} = nn.AdaptiveAvgPool2d(1)"], \
            [f"{st.name} = torch.flatten(self.{st.name}({st.ins[0]}), 1)"]
    return {st.name: (n, c)}, [], [f"{st.name} = {_GAP[st.attrs['style']].format(x=st.ins[0])}"]


def emit_unflatten(st: Step, xs: list[Shape]) -> Emitted:
    """(N, F) -> (N, F, 1, 1)."""
    n, f = _rank(xs[0], 2, "unflatten")
    expr = _UNFLATTEN[st.attrs["style"]].format(x=st.ins[0], batch=BATCH, f=f)
    return {st.name: (n, f, 1, 1)}, [], [f"{st.name} = {expr}"]


def emit_linear(st: Step, xs: list[Shape]) -> Emitted:
    """Linear on (N, F)."""
    n, f = _rank(xs[0], 2, "linear")
    return _module(st, f"nn.Linear({f}, {st.attrs['out']}, bias={st.attrs['bias']})", st.ins[0], (n, st.attrs["out"]))


EMITTERS: dict[str, Callable[[Step, list[Shape]], Emitted]] = {
    "conv": emit_conv, "conv_transpose": emit_conv_transpose, "bn": emit_batch_norm, "act": emit_act,
    "binary": emit_binary, "cat": emit_cat, "split": emit_split, "se": emit_se, "pool": emit_pool,
    "interpolate": emit_interpolate, "shuffle": emit_shuffle, "cl_linear": emit_channels_last_linear,
    "flatten": emit_flatten, "gap": emit_gap, "unflatten": emit_unflatten, "linear": emit_linear,
}


def emit_step(st: Step, shapes: dict[str, Shape]) -> Emitted:
    """Emit one step given the shapes defined so far; raise ``InvalidNet`` when it does not fit."""
    missing = [r for r in st.ins if r not in shapes]
    _need(not missing, f"{st.name} reads undefined {missing}")
    outs, init, fwd = (EMITTERS.get(st.op) or TRUST_EMITTERS[st.op])(st, [shapes[r] for r in st.ins])
    for s in outs.values():
        _need(min(s) >= 1, f"{st.name}: empty output {s}")
        _need(s[1] <= (MAX_CHANNELS if len(s) == 4 else MAX_FEATURES), f"{st.name}: too wide {s}")
        _need(len(s) != 4 or max(s[2:]) <= MAX_SPATIAL, f"{st.name}: too large {s}")
    return outs, init, fwd


def to_source(spec: NetSpec, class_name: str = "Net") -> str:
    """The source of an ``nn.Module`` class computing ``spec`` (needs ``torch``, ``nn`` and ``F`` in scope)."""
    shapes = {f"x{i}": s for i, s in enumerate(spec.inputs)}
    init: list[str] = []
    fwd: list[str] = []
    read = {v for st in spec.steps for v in st.ins} | set(spec.outputs)
    for st in spec.steps:
        outs, i_lines, f_lines = emit_step(st, shapes)
        shapes.update(outs)
        init += i_lines
        if st.op != "split" and st.name not in read:  # dead code stays in the graph, without a dead name
            f_lines[-1] = f_lines[-1].removeprefix(f"{st.name} = ")
        out = list(outs.values())
        comment = f"{len(out)} x {out[0]}" if len(out) > 3 and len(set(out)) == 1 else ", ".join(map(str, out))
        fwd += f_lines[:-1] + [f"{f_lines[-1]}  # {comment}"]
    _need(bool(spec.outputs) and all(o in shapes for o in spec.outputs), f"undefined outputs {spec.outputs}")
    args = ", ".join(f"x{i}: torch.Tensor" for i in range(len(spec.inputs)))
    multi = len(spec.outputs) > 1
    ret = f"({', '.join(spec.outputs)})" if multi else spec.outputs[0]
    lines = [f"class {class_name}(nn.Module):", "    def __init__(self) -> None:", "        super().__init__()"]
    lines += [f"        {s}" for s in init]
    lines += ["", f"    def forward(self, {args}) -> {'tuple[torch.Tensor, ...]' if multi else 'torch.Tensor'}:"]
    lines += [f"        {s}" for s in fwd] + [f"        return {ret}"]
    return "\n".join(lines) + "\n"


def load_class(source: str, class_name: str = "Net") -> type[nn.Module]:
    """Execute module source made by ``to_source`` and return the class."""
    from fxprune.testing.trust_ops import QUICK_GELU, OpaqueConv, OpaqueMLP

    namespace: dict[str, Any] = {"__name__": "fxprune_fuzz_net", "torch": torch, "nn": nn, "F": F,
                                 "OpaqueConv": OpaqueConv, "OpaqueMLP": OpaqueMLP, "QUICK_GELU": QUICK_GELU}
    exec(compile(source, "<fxprune fuzz net>", "exec"), namespace)  # noqa: S102 - our own generated source
    return namespace[class_name]


def instantiate(cls: type[nn.Module], seed: int) -> nn.Module:
    """Build ``cls()`` with seeded weights, random BatchNorm statistics and norm affines, in eval mode (the
    global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.6 - 0.3)
    return model.eval()


def make_inputs(shapes: tuple[Shape, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal example inputs of the given shapes."""
    gen = torch.Generator().manual_seed(seed + 1)
    return tuple(torch.randn(s, generator=gen) for s in shapes)


def build(spec: NetSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """Return the module, example inputs and source of ``spec``."""
    source = to_source(spec)
    return instantiate(load_class(source), spec.seed), make_inputs(spec.inputs, spec.seed), source
