"""Find the residual stream of a language model: every parameter dim that one hidden channel indexes.

The model runs once on example inputs under a ``TorchFunctionMode`` that follows the *last dim* of every
tensor back to the parameter dims that produced it (its provenance): an embedding's table columns, a
Linear's rows, HF ``Conv1D``'s columns, a norm's weight. A stream starts from seed dims (the input
embedding's columns); a tensor is *in the stream* when its provenance meets the stream's dims. Then:

- an elementwise op that meets a stream tensor (a residual add, a norm's ``weight * x``) puts the other
  operand's provenance in the stream (the writers: ``o_proj``, ``down_proj``, ``c_proj``, position embeddings);
- a Linear / ``addmm`` / ``matmul`` that reads a stream tensor puts its input dim in the stream (the readers:
  q/k/v, gate/up, ``c_attn``, ``lm_head``);
- ``layer_norm`` and ``rms_norm`` put their weight and bias in the stream; a reduction over the last dim
  (an RMSNorm's ``pow(2).mean(-1)``) is a norm statistic, computed over the kept channels after pruning.

Any other op that touches a stream tensor (a slice or reshape of the hidden dim, a concat along it) is
refused with ``HiddenSizeError`` naming the op and the module. The model is run again until the stream stops
growing (a writer found late may have been read before). Nothing here is specific to a model family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from fxprune.errors import FxPruneError
from fxprune.rules.registry import runtime_traits

Space = tuple[str, int]  # (parameter or buffer name, dim)


class HiddenSizeError(FxPruneError):
    """The residual stream (hidden size) of this model cannot be pruned; the message names the op or class."""


@dataclass(frozen=True)
class Stream:
    """One channel space of width ``size`` and the parameter dims it indexes (index ``j`` of each is channel ``j``).

    Attributes:
        size: the width (the hidden size).
        spaces: every (parameter or buffer name, dim) that is sliced with the stream, sorted.
        readers: the spaces that read the stream (Linear input dims), a subset of ``spaces``.
        norms: the modules that normalise over the stream (``layer_norm``, ``rms_norm`` or a reduction).
    """

    size: int
    spaces: tuple[Space, ...]
    readers: tuple[Space, ...]
    norms: tuple[str, ...]


class _Probe(TorchFunctionMode):
    """Follows last-dim provenance through one forward; grows ``spaces`` (see the module docstring)."""

    def __init__(self, names: dict[int, str], spaces: set[Space], size: int,
                 activations: dict[Space, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.names, self.spaces, self.size = names, spaces, size
        self.readers: set[Space] = set()
        self.norms: set[str] = set()
        self.prov: dict[int, frozenset[Space]] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique during the run
        self.where: list[str] = [""]  # the module stack, for messages
        self.activations = activations  # reader space -> sum of squares of its input, per channel

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._see(getattr(func, "__name__", repr(func)), runtime_traits(func), args, kwargs, out)
        return out

    def provenance(self, t: Any) -> frozenset[Space]:
        """The parameter dims that produced ``t``'s last dim."""
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return frozenset()
        name = self.names.get(id(t))
        if name is not None:
            return frozenset({(name, t.dim() - 1)})
        return self.prov.get(id(t), frozenset())

    def in_stream(self, t: Any) -> bool:
        """Whether ``t``'s last dim is the stream."""
        return bool(self.provenance(t) & self.spaces)

    def _set(self, t: Any, prov: frozenset[Space]) -> None:
        if isinstance(t, torch.Tensor) and prov and id(t) not in self.names:
            self.prov[id(t)] = prov
            self.alive.append(t)

    def _refuse(self, op: str, what: str) -> HiddenSizeError:
        return HiddenSizeError(f"{op} in {self.where[-1] or 'the root'} {what} the hidden dim (the residual "
                               f"stream): fxprune cannot prune the hidden size of this model")

    def _see(self, op: str, traits: frozenset[str], args: Any, kwargs: dict[str, Any], out: Any) -> None:
        """Follow the stream through one op (``traits``: what the registry says it is, ``rules/traits.py``)."""
        tensors = [t for t in _flat((args, kwargs)) if isinstance(t, torch.Tensor)]
        touched = [t for t in tensors if self.in_stream(t)]
        outs = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return  # sizes, dtypes, items: nothing flows on
        if op in ("linear", "addmm", "matmul", "mm"):
            self._project(op, args, kwargs, out, touched)
        elif op == "embedding":
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self._set(out, self.provenance(weight))
        elif "norm" in traits:
            x, weight = args[0], _arg(args, kwargs, 2, "weight")
            extra = [self.provenance(p) for p in (weight, _arg(args, kwargs, 3, "bias")) if p is not None]
            if op == "rms_norm":
                extra = extra[:1]
            if touched:
                self.norms.add(self.where[-1])
                for p in extra:
                    self.spaces.update(p)
            self._set(out, self.provenance(x).union(*extra))
        elif "elementwise" in traits:
            self._elementwise(op, tensors, touched, outs[0])
        elif "stream_layout" in traits:
            self._shape(op, tensors, touched, out)
        elif "reduction" in traits and touched:
            if outs[0].dim() and outs[0].shape[-1] == self.size and tensors[0].dim() == outs[0].dim():
                self._set(outs[0], self.provenance(tensors[0]))  # reduced over another dim
            else:  # a statistic over the hidden dim (a norm's): over the kept channels after pruning
                self.norms.add(self.where[-1])
        elif touched:
            raise self._refuse(op, "reads")

    def _project(self, op: str, args: Any, kwargs: dict[str, Any], out: Any, touched: list[torch.Tensor]) -> None:
        if op == "linear":
            x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            read, made = 1, [(w, 0), (b, 0)]
        elif op == "addmm":  # HF Conv1D: addmm(bias, x, weight[in, out])
            b, x, w = args[0], args[1], args[2]
            read, made = 0, [(w, 1), (b, 0)]
        else:
            x, w, b = args[0], args[1], None
            read, made = 0, [(w, 1)]
        if any(t is not x and t is not w and t is not b for t in touched) or (x is not w and self.in_stream(w)
                                                                             and id(w) not in self.names):
            raise self._refuse(op, "multiplies by a tensor in")
        touched = [x] if self.in_stream(x) and id(x) not in self.names else []
        name = self.names.get(id(w))
        if touched:
            if name is None:
                raise self._refuse(op, "reads with a weight that is not a parameter")
            self.spaces.add((name, read))
            self.readers.add((name, read))
            if self.activations is not None:
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                sq = flat.pow(2).sum(0)
                self.activations[(name, read)] = self.activations.get((name, read), 0) + sq  # type: ignore[assignment]
        prov = frozenset((self.names[id(t)], d) for t, d in made
                         if isinstance(t, torch.Tensor) and id(t) in self.names and t.dim() > d)
        self._set(out, prov)

    def _elementwise(self, op: str, tensors: list[torch.Tensor], touched: list[torch.Tensor],
                     out: torch.Tensor) -> None:
        width = out.shape[-1] if out.dim() else None
        full = [t for t in tensors if t.dim() and t.shape[-1] == width and width != 1]
        if touched and width != self.size:
            raise self._refuse(op, "broadcasts")
        if touched:
            for t in full:
                prov = self.provenance(t)
                if not prov:
                    raise self._refuse(op, f"adds a {tuple(t.shape)} value made without parameters to")
                self.spaces.update(prov)
        self._set(out, frozenset().union(*(self.provenance(t) for t in full)))

    def _shape(self, op: str, tensors: list[torch.Tensor], touched: list[torch.Tensor], out: Any) -> None:
        source = tensors[0]
        if op in ("cat", "concat", "stack"):
            dim = _dim_arg(out, tensors)
            if touched and (dim == -1 or dim == source.dim() - (op != "stack")):
                raise self._refuse(op, "concatenates along")
            prov = frozenset().union(*(self.provenance(t) for t in tensors))
            self._set(out, prov)
            return
        outs = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        keeps = all(o.dim() and o.shape[-1] == source.shape[-1] for o in outs) and source.dim() > 0
        if op in ("transpose", "permute") and keeps:
            keeps = _keeps_last(op, source, outs[0])
        if not keeps:
            if touched:
                raise self._refuse(op, "reshapes or slices")
            return
        for o in outs:
            self._set(o, self.provenance(source))

    @contextlib.contextmanager
    def tracking_modules(self, root: nn.Module) -> Iterator[None]:
        """Keep ``where`` at the module being run (error messages name it)."""
        names = {id(m): n for n, m in root.named_modules()}

        def enter(mod: nn.Module, _args: Any) -> None:
            self.where.append(names[id(mod)])

        def leave(mod: nn.Module, _args: Any, _out: Any) -> None:
            self.where.pop()

        hooks = []
        for m in root.modules():
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def _flat(value: Any) -> list[Any]:
    return torch.utils._pytree.tree_leaves(value)


def _arg(args: Any, kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _dim_arg(out: Any, tensors: list[torch.Tensor]) -> int:
    """The dim a cat/stack joined along, read off the shapes (-1 when it is the last)."""
    if not isinstance(out, torch.Tensor) or not tensors:
        return 0
    first = tensors[0]
    if out.dim() == first.dim():
        diff = [d for d in range(out.dim()) if out.shape[d] != first.shape[d]]
        return -1 if diff and diff[0] == out.dim() - 1 else (diff[0] if diff else 0)
    return -1 if out.shape[-1] != first.shape[-1] else 0


def _keeps_last(op: str, source: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether a transpose/permute leaves the last dim where it was (same stride pattern at the end)."""
    return out.dim() == source.dim() and out.stride()[-1] == source.stride()[-1]


def tensor_names(model: nn.Module) -> dict[int, str]:
    """Every parameter and buffer by id, under its first name (a tied parameter has one id)."""
    names: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(t), name)
    return names


def find_stream(model: nn.Module, seeds: set[Space], size: int, inputs: tuple[Any, ...],
                calibration: list[tuple[Any, ...]] | None = None,
                activations: dict[Space, torch.Tensor] | None = None) -> Stream:
    """The stream grown from ``seeds`` over runs of ``model`` on ``inputs`` (until it is stable).

    Args:
        model: a private copy in eval mode (it is run, never written).
        seeds: the spaces the stream starts from (the input embedding's columns).
        size: the stream's width.
        inputs: positional inputs of one forward.
        calibration: batches of positional inputs, each run once more to fill ``activations``.
        activations: filled with the sum of squares of each reader's input, per channel.

    Raises:
        HiddenSizeError: an op the stream reaches cannot be pruned along it (named with its module).
    """
    names = tensor_names(model)
    spaces = set(seeds)
    for _ in range(8):  # a writer found late may have been read before it was known: run until stable
        before = set(spaces)
        probe = _run(model, names, spaces, size, inputs)
        if spaces == before:
            break
    else:
        raise HiddenSizeError("the residual stream did not settle after 8 runs")
    for batch in calibration or ():
        _run(model, names, spaces, size, batch, activations)
    sizes = {n: t.shape for n, t in [*model.named_parameters(), *model.named_buffers()]}
    bad = [s for s in spaces if sizes[s[0]][s[1]] != size]
    if bad:
        raise HiddenSizeError(f"{bad[0][0]} dim {bad[0][1]} is {sizes[bad[0][0]][bad[0][1]]} wide but meets "
                              f"the hidden dim ({size})")
    return Stream(size, tuple(sorted(spaces)), tuple(sorted(probe.readers)), tuple(sorted(probe.norms)))


def _run(model: nn.Module, names: dict[int, str], spaces: set[Space], size: int, batch: tuple[Any, ...],
         activations: dict[Space, torch.Tensor] | None = None) -> _Probe:
    probe = _Probe(names, spaces, size, activations)
    with torch.no_grad(), probe.tracking_modules(model), probe:
        model(*batch)
    return probe
