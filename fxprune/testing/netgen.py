"""A seeded generator of random, valid, FX-traceable CNN-style networks for fuzzing fxprune.

``random_net(seed)`` draws a DAG of ops (see ``OP_WEIGHTS``): convs (dense, grouped, depthwise with a
channel multiplier, strided, dilated), ConvTranspose2d, BatchNorm, activations, residual add and mul,
broadcast gates, cat, split/chunk/slices at random offsets, SE gates, pooling, interpolation, channel shuffle,
channels-last Linear, flatten/view into Linear, and several outputs. The same seed always gives the same network,
weights and inputs. Ops are drawn one at a time; each reads the newest value most of the time (chains)
and an older one otherwise (branches, skips); ops that need a partner of a matching shape (add, cat)
build one when none exists.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn as nn

from fxprune.testing.invalid import InvalidNet
from fxprune.testing.netspec import ACT_FUNCTIONS, BATCH, NetSpec, Shape, Step, build, emit_step
from fxprune.testing.trust_ops import FRESH_PRODUCERS

ACTS = tuple(ACT_FUNCTIONS)


class _Draft:
    """A network under construction: the values defined so far and a random source."""

    def __init__(self, rng: random.Random, inputs: tuple[Shape, ...]) -> None:
        self.rng = rng
        self.shapes: dict[str, Shape] = {f"x{i}": s for i, s in enumerate(inputs)}
        self.steps: list[Step] = []
        self.count = 0

    def name(self) -> str:
        self.count += 1
        return f"v{self.count}"

    def pick(self, rank: int | None = 4, ok: Callable[[Shape], bool] | None = None) -> str | None:
        """A value of the given rank: the newest one with probability 0.55, else any (None if there is none)."""
        cands = [v for v, s in self.shapes.items() if (rank is None or len(s) == rank) and (ok is None or ok(s))]
        if not cands:
            return None
        return cands[-1] if self.rng.random() < 0.55 else self.rng.choice(cands)

    def try_add(self, steps: list[Step]) -> bool:
        """Append ``steps`` if all of them fit; otherwise change nothing."""
        shapes = dict(self.shapes)
        try:
            for st in steps:
                shapes.update(emit_step(st, shapes)[0])
        except InvalidNet:
            return False
        self.steps += steps
        self.shapes = shapes
        return True


def _conv_attrs(r: random.Random, c: int) -> dict[str, object]:
    mode = r.choices(["dense", "grouped", "dw"], [5, 2, 2])[0]
    attrs: dict[str, object] = {"k": r.choice([1, 3, 3, 5]), "stride": r.choices([1, 2], [4, 1])[0],
                                "dilation": r.choices([1, 2], [5, 1])[0], "same": r.random() < 0.85,
                                "bias": r.random() < 0.4}
    divisors = [g for g in (2, 3, 4, 8) if c % g == 0 and g < c]
    if mode == "grouped" and divisors:
        g = r.choice(divisors)
        attrs.update(mode="grouped", groups=g, out=g * r.randint(max(1, 4 // g), max(1, 32 // g)))
    elif mode == "dw":
        attrs.update(mode="dw", mult=r.choice([1, 1, 2]))
    else:
        attrs.update(mode="dense", out=r.randint(4, 32))
    return attrs


def _same_shape_branch(d: _Draft, x: str) -> list[Step]:
    """conv (stride 1, same padding, same width) [-> BN] [-> act]: a residual branch for ``x``."""
    r, c = d.rng, d.shapes[x][1]
    dw = r.random() < 0.3
    conv = {"mode": "dw" if dw else "dense", "k": r.choice([1, 3]), "stride": 1, "dilation": 1, "same": True,
            "bias": r.random() < 0.3, "mult": 1, "out": c}
    steps = [Step(d.name(), "conv", (x,), conv)]
    if r.random() < 0.6:
        steps.append(Step(d.name(), "bn", (steps[-1].name,)))
    if r.random() < 0.6:
        steps.append(Step(d.name(), "act", (steps[-1].name,), {"kind": r.choice(ACTS), "style": "fn"}))
    return steps


def propose_conv(d: _Draft) -> list[Step]:
    x = d.pick(4)
    return [] if x is None else [Step(d.name(), "conv", (x,), _conv_attrs(d.rng, d.shapes[x][1]))]


def propose_conv_transpose(d: _Draft) -> list[Step]:
    x = d.pick(4, lambda s: max(s[2:]) <= 16)
    if x is None:
        return []
    r = d.rng
    k, s = r.choice([(2, 2), (3, 2), (4, 2), (3, 1), (1, 1)])
    groups = r.choice([2, 4]) if r.random() < 0.1 else 1
    attrs = {"out": groups * r.randint(2, 16), "k": k, "stride": s, "padding": r.randint(0, (k - 1) // 2),
             "output_padding": r.randint(0, s - 1), "groups": groups, "bias": r.random() < 0.5}
    return [Step(d.name(), "conv_transpose", (x,), attrs)]


def propose_bn(d: _Draft) -> list[Step]:
    x = d.pick(4) if d.rng.random() < 0.85 else d.pick(2)
    return [] if x is None else [Step(d.name(), "bn", (x,))]


def propose_act(d: _Draft) -> list[Step]:
    x = d.pick(None)
    style = d.rng.choice(["module", "fn", "method"])
    return [] if x is None else [Step(d.name(), "act", (x,), {"kind": d.rng.choice(ACTS), "style": style})]


def propose_binary(d: _Draft) -> list[Step]:
    r = d.rng
    attrs = {"fn": r.choices(["add", "mul"], [3, 1])[0], "style": r.choice(["op", "op", "torch", "method"])}
    by_shape: dict[Shape, list[str]] = {}
    for v, s in d.shapes.items():
        by_shape.setdefault(s, []).append(v)
    pairs = [vs for vs in by_shape.values() if len(vs) >= 2]
    if pairs and r.random() < 0.6:
        a, b = r.sample(r.choice(pairs), 2)
        return [Step(d.name(), "binary", (a, b), attrs)]
    x = d.pick(4) if r.random() < 0.85 else None
    if x is None:
        return []
    branch = _same_shape_branch(d, x)
    ins = (x, branch[-1].name) if r.random() < 0.5 else (branch[-1].name, x)
    return [*branch, Step(d.name(), "binary", ins, attrs)]


def propose_broadcast(d: _Draft) -> list[Step]:
    """x (op) gate with gate N x C x 1 x 1: an existing one, or pool -> conv1x1 -> sigmoid built from steps."""
    r = d.rng
    attrs = {"fn": r.choice(["add", "mul"]), "style": "op", "broadcast": True}
    gate = d.pick(4, lambda s: s[2:] == (1, 1))
    x = None if gate is None else d.pick(4, lambda s: s[:2] == d.shapes[gate][:2] and s[2:] != (1, 1))
    if gate is not None and x is not None:
        return [Step(d.name(), "binary", (x, gate), attrs)]
    x = d.pick(4, lambda s: s[2:] != (1, 1))
    if x is None:
        return []
    pool = Step(d.name(), "pool", (x,), {"kind": "adaptive_avg", "style": r.choice(["module", "fn"]), "size": (1, 1)})
    conv = Step(d.name(), "conv", (pool.name,), {"mode": "dense", "out": d.shapes[x][1], "k": 1, "stride": 1,
                                                 "dilation": 1, "same": True, "bias": True})
    act = Step(d.name(), "act", (conv.name,), {"kind": "sigmoid", "style": r.choice(["module", "fn", "method"])})
    return [pool, conv, act, Step(d.name(), "binary", (x, act.name), attrs)]


def propose_cat(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4) if r.random() < 0.85 else d.pick(2)
    if x is None:
        return []
    key = d.shapes[x][:1] + d.shapes[x][2:]
    partners = [v for v, s in d.shapes.items() if v != x and len(s) == len(d.shapes[x]) and s[:1] + s[2:] == key]
    style = r.choice(["list", "tuple"])
    if partners and r.random() < 0.7:
        ins = [x, *r.sample(partners, min(len(partners), r.choice([1, 1, 2])))]
        r.shuffle(ins)
        return [Step(d.name(), "cat", tuple(ins), {"style": style})]
    if len(d.shapes[x]) != 4:
        return []
    attrs = _conv_attrs(r, d.shapes[x][1])
    attrs.update(stride=1, same=True, k=r.choice([1, 3]), dilation=1)
    conv = Step(d.name(), "conv", (x,), attrs)
    ins = (x, conv.name) if r.random() < 0.5 else (conv.name, x)
    return [conv, Step(d.name(), "cat", ins, {"style": style})]


def propose_split(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4 if r.random() < 0.85 else 2, lambda s: s[1] >= 2)
    if x is None:
        return []
    c = d.shapes[x][1]
    mode = r.choice(["sizes", "sizes", "int", "chunk", "slice"])
    attrs: dict[str, object] = {"mode": mode, "style": r.choice(["pos", "neg"] if mode == "slice" else ["fn", "method"])}
    if mode in ("sizes", "slice"):
        cuts = sorted(r.sample(range(1, c), min(c - 1, r.choice([1, 1, 2]))))
        attrs["sizes"] = [b - a for a, b in zip([0, *cuts], [*cuts, c], strict=True)]
    elif mode == "int":
        attrs["size"] = r.randint(1, c - 1)
    else:
        attrs["chunks"] = r.randint(2, min(4, c))
    return [Step(d.name(), "split", (x,), attrs)]


def propose_se(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4)
    if x is None:
        return []
    attrs = {"hidden": r.randint(2, max(2, d.shapes[x][1] // 2)), "style": r.choice(["conv", "linear"]),
             "pool": r.choice(["adaptive", "mean"]), "gate": r.choice(["sigmoid", "sigmoid", "hardsigmoid"]),
             "act": r.choice(["relu", "silu"]), "expand": r.choice(["view", "index", "unsqueeze"])}
    return [Step(d.name(), "se", (x,), attrs)]


def propose_pool(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4, lambda s: min(s[2:]) >= 2)
    if x is None:
        return []
    kind = r.choice(["max", "max", "avg", "adaptive_avg", "adaptive_max"])
    attrs: dict[str, object] = {"kind": kind, "style": r.choice(["module", "fn"])}
    if kind in ("max", "avg"):
        k = r.choice([2, 2, 3])
        attrs.update(k=k, stride=r.choice([1, 2, 2]) if k == 3 else 2, padding=r.randint(0, k // 2))
    else:
        attrs["size"] = (r.randint(1, 4), r.randint(1, 4))
    return [Step(d.name(), "pool", (x,), attrs)]


def propose_interpolate(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4, lambda s: max(s[2:]) <= 16)
    if x is None:
        return []
    size = None if r.random() < 0.5 else (r.randint(4, 24), r.randint(4, 24))
    attrs = {"mode": r.choice(["nearest", "bilinear"]), "size": size, "style": r.choice(["module", "fn", "fn"])}
    return [Step(d.name(), "interpolate", (x,), attrs)]


def propose_shuffle(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4, lambda s: any(s[1] % g == 0 and s[1] > g for g in (2, 3, 4)))
    if x is None:
        return []
    g = r.choice([g for g in (2, 3, 4) if d.shapes[x][1] % g == 0 and d.shapes[x][1] > g])
    attrs = {"groups": g, "batch": r.choices(["size", "literal"], [4, 1])[0], "back": r.choice(["literal", "minus1"])}
    return [Step(d.name(), "shuffle", (x,), attrs)]


def propose_cl_linear(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4)
    if x is None:
        return []
    attrs = {"out": r.randint(4, 32), "bias": r.random() < 0.7, "norm": r.random() < 0.05,
             "act": r.choice([None, "gelu", "relu"]), "permute": r.choice(["fn", "method"])}
    return [Step(d.name(), "cl_linear", (x,), attrs)]


def propose_flatten(d: _Draft) -> list[Step]:
    r = d.rng
    x = d.pick(4, lambda s: s[1] * s[2] * s[3] <= 2048)
    if x is None:
        return []
    style = r.choice(["torch", "method", "view", "reshape", "module", "view_literal"])
    flat = Step(d.name(), "flatten", (x,), {"style": style, "batch": "literal" if style == "reshape" else "size"})
    return [flat, Step(d.name(), "linear", (flat.name,), {"out": r.randint(4, 32), "bias": r.random() < 0.7})]


def propose_gap(d: _Draft) -> list[Step]:
    x = d.pick(4)
    return [] if x is None else [Step(d.name(), "gap", (x,), {"style": d.rng.choice(["adaptive", "mean", "module"])})]


def propose_linear(d: _Draft) -> list[Step]:
    x = d.pick(2)
    attrs = {"out": d.rng.randint(4, 32), "bias": d.rng.random() < 0.7}
    return [] if x is None else [Step(d.name(), "linear", (x,), attrs)]


def propose_unflatten(d: _Draft) -> list[Step]:
    x = d.pick(2)
    if x is None:
        return []
    style = d.rng.choice(["view", "index", "unsqueeze", "reshape"])
    attrs = {"style": style, "batch": "literal" if style == "reshape" else "size"}
    return [Step(d.name(), "unflatten", (x,), attrs)]


# op -> (proposer, weight). Weights favour the ops that create and couple channels.
def propose_inplace(d: _Draft) -> list[Step]:
    """``a += b`` on a fresh value ``a`` that later steps may still read under its old name."""
    fresh = {st.name for st in d.steps if st.op in FRESH_PRODUCERS}
    by_shape: dict[Shape, list[str]] = {}
    for v, s in d.shapes.items():
        by_shape.setdefault(s, []).append(v)
    pairs = [(a, b) for vs in by_shape.values() for a in vs for b in vs if a != b and a in fresh]
    if not pairs:
        return []
    a, b = d.rng.choice(pairs)
    return [Step(d.name(), "inplace", (a, b), {"fn": d.rng.choices(["add", "mul"], [3, 1])[0]})]


def propose_trust_op(d: _Draft) -> list[Step]:
    """One of dropout, a hooked conv, a functional conv, tied convs (also into an opaque module), a norm over
    channels or a spatial split with computed sizes."""
    r = d.rng
    x = d.pick(4)
    if x is None:
        return []
    op = r.choice(["dropout", "hooked", "fconv", "tied", "cl_norm", "cl_norm", "spatial_split", "tied_opaque"])
    extra = random.Random(str(r.getstate()[1][:8]))  # its own draw: r's stream stays as it was
    if extra.random() < 0.15:
        op = extra.choice(["state", "state", "func_module", "opaque_mlp", "opaque_mlp", "gqa", "gqa"])
    attrs: dict[str, object] = {}
    if op == "gqa":
        attrs = {"kv": extra.choice([1, 2]), "rep": extra.choice([2, 3]), "d": extra.choice([4, 8]),
                 "repeat": extra.random() < 0.5}  # keys repeated as transformers' repeat_kv, or the kernel's grouping
    if op == "state":
        attrs = {"kind": r.choice(["ema", "count", "copy"])}
    elif op == "dropout":
        attrs = {"p": r.choice([0.1, 0.5]), "read": r.choice(["attr", "getattr", "modules"])}
    elif op == "fconv":
        attrs = {"out": r.randint(4, 32), "k": r.choice([1, 3]), "bias": r.random() < 0.5}
    elif op == "cl_norm":
        attrs = {"kind": r.choice(["ln_module", "rms_module", "ln_fn", "rms_fn"])}
    return [Step(d.name(), op, (x,), attrs)]


OP_WEIGHTS: dict[str, tuple[Callable[[_Draft], list[Step]], float]] = {
    "conv": (propose_conv, 5.0), "conv_transpose": (propose_conv_transpose, 0.7), "bn": (propose_bn, 2.0),
    "act": (propose_act, 2.0), "binary": (propose_binary, 2.0), "broadcast": (propose_broadcast, 0.5),
    "cat": (propose_cat, 1.5), "split": (propose_split, 1.3), "se": (propose_se, 0.8),
    "pool": (propose_pool, 1.0), "interpolate": (propose_interpolate, 0.6), "shuffle": (propose_shuffle, 0.7),
    "cl_linear": (propose_cl_linear, 0.7), "flatten": (propose_flatten, 0.5), "gap": (propose_gap, 0.4),
    "linear": (propose_linear, 1.0), "unflatten": (propose_unflatten, 0.3),
    "inplace": (propose_inplace, 0.8), "trust": (propose_trust_op, 1.2),
}


def random_spec(seed: int, *, max_nodes: int = 12) -> NetSpec:
    """Draw the op list of random network ``seed`` (at most ``max_nodes`` steps)."""
    r = random.Random(seed)
    hw = (r.randint(8, 16), r.randint(8, 16))
    if random.Random(~seed).random() < 0.1:  # own stream: the other seeds draw the nets they always drew
        hw = (96, 96)  # sides the eager check first runs smaller (64: passes/eager_check.smaller_inputs)
    inputs = [(BATCH, r.randint(3, 8), *hw)]
    if r.random() < 0.12:
        inputs.append((BATCH, r.randint(3, 8), *(hw if r.random() < 0.6 else (r.randint(8, 16), r.randint(8, 16)))))
    d = _Draft(r, tuple(inputs))
    if r.random() < 0.8:
        d.try_add(propose_conv(d))
    target = r.randint(max(1, max_nodes // 3), max_nodes)
    names, weights = list(OP_WEIGHTS), [w for _, w in OP_WEIGHTS.values()]
    for _ in range(30 * max_nodes):
        if len(d.steps) >= target:
            break
        steps = OP_WEIGHTS[r.choices(names, weights)[0]][0](d)
        if steps and len(d.steps) + len(steps) <= max_nodes:
            d.try_add(steps)
    if not d.steps:
        d.try_add(_same_shape_branch(d, "x0"))
    last = list(d.shapes)[-1]
    used = {v for st in d.steps for v in st.ins}
    leaves = [v for v in d.shapes if v not in used and v != last and not v.startswith("x")]
    extra = [v for v in leaves if r.random() < 0.5]
    return NetSpec(seed, tuple(inputs), tuple(d.steps), (last, *extra))


def random_net(seed: int, *, max_nodes: int = 12) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """A random valid network, its example inputs and its readable source.

    Args:
        seed: selects the network; the same seed gives the same architecture, weights and inputs.
        max_nodes: the most ops (steps) the network has; composite ops (an SE gate) count as one.

    Returns:
        ``(module, example_inputs, source)``: an eval-mode ``nn.Module`` that ``torch.fx.symbolic_trace``
        captures, a tuple of input tensors (batch 2), and the Python source of its class.
    """
    return build(random_spec(seed, max_nodes=max_nodes))
