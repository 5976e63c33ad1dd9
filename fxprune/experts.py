"""Fused mixture-of-experts modules, pruned expert by expert with an exact oracle.

Hugging Face keeps a MoE layer's experts (Qwen2-MoE, Qwen3-MoE, Mixtral, ...) in one module with 3D parameters
and loops over the experts a batch hits: data-dependent control flow that torch.fx cannot trace. Expert ``e``
is a gated MLP ``down[e] @ (act(gate[e] @ x) * (up[e] @ x))``; its inner channels are pruned directly:

* recognised structurally (``layout``): the one known layout is transformers' fused experts,
  ``gate_up_proj`` ``[E, 2I, H]`` with the gate rows first and then the up rows (``chunk(2, dim=-1)``),
  ``down_proj`` ``[E, H, I]`` (both ``[E, in, out]`` when ``is_transposed``), optional ``gate_up_proj_bias``
  ``[E, 2I]`` and ``down_proj_bias`` ``[E, H]``, ``act_fn`` applied to the gate. Interleaved gate/up, custom
  gating (``_apply_gate``), a post-expert norm or any other parameter: refused (left alone).
* every expert keeps the same number of channels (3D parameters have one width) chosen by its own scores, by
  the part's criterion over the same parameter slices fxprune's groups would hold (``l2``: the norm of the
  gate/up rows plus the norm of the down columns); gradients and calibration activations where the criterion
  asks for them. The router and ``num_experts`` are untouched.
* proven in float64 on what reached the module during the example forward, and on those hidden states routed
  to each expert in turn: the pruned module's output equals the original's with the removed channels zeroed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.outputs import tensors_of
from fxprune.passes.importance import Criterion, GroupTensors, MemberSlice, resolve
from fxprune.plan import ChannelGroup
from fxprune.validate import check_scores

_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim")  # what a module may call its width I
_GATE = "_default_apply_gate"  # transformers' gating (act(gate) * up after chunk(2)); others are refused
_TOL = 1e-9  # float64: |pruned - masked| <= _TOL * max(1, max |masked|)
Calls = Sequence[tuple[tuple[Any, ...], dict[str, Any]]]  # (args, kwargs) of calls of the experts module


@dataclass(frozen=True)
class Layout:
    """Shape of a fused-experts module (see the module docstring).

    Attributes:
        experts: the expert count E.
        hidden: the input and output width H.
        inner: the inner width I of every expert.
        transposed: weights stored ``[E, in, out]`` instead of ``[E, out, in]``.
        bias: whether ``gate_up_proj_bias`` and ``down_proj_bias`` exist.
    """

    experts: int
    hidden: int
    inner: int
    transposed: bool
    bias: bool

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """One expert's weight (or gradient) as stored, as ``[out, in]``: gate_up ``[2I, H]``, down ``[H, I]``."""
        return t.T if self.transposed and t.dim() == 2 else t


def layout(m: nn.Module) -> Layout | None:
    """The layout of ``m`` when it is a fused-experts module this pass can prune exactly, else None."""
    gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3):
        return None
    t = bool(getattr(m, "is_transposed", False))
    e, two_i, h = (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1]) if t else tuple(gate_up.shape)
    dh, i = (down.shape[2], down.shape[1]) if t else (down.shape[1], down.shape[2])
    bias = isinstance(getattr(m, "gate_up_proj_bias", None), nn.Parameter)
    names = {"gate_up_proj", "down_proj"} | ({"gate_up_proj_bias", "down_proj_bias"} if bias else set())
    if (down.shape[0] != e or two_i != 2 * i or dh != h or i < 2 or getattr(m, "num_experts", e) != e
            or any(getattr(m, a, i) != i for a in _WIDTH_ATTRS)
            or {n for n, _ in m.named_parameters()} != names or any(True for _ in m.buffers())
            or not callable(getattr(m, "act_fn", None))
            or not getattr(m, "has_gate", True) or getattr(m, "has_post_expert_norm", False)
            or not getattr(m, "is_concatenated", True)
            or getattr(getattr(type(m), "_apply_gate", None), "__name__", _GATE) != _GATE
            or bias and (m.gate_up_proj_bias.shape != (e, 2 * i) or m.down_proj_bias.shape != (e, h))):
        return None
    return Layout(e, h, i, t, bias)


def score(m: nn.Module, lay: Layout, criterion: Criterion, grads: dict[str, torch.Tensor] | None = None,
          acts: torch.Tensor | None = None) -> list[np.ndarray]:
    """Per expert, one score per inner channel from ``criterion`` over that expert's parameter slices.

    Args:
        m: the experts module.
        lay: its layout.
        criterion: an fxprune criterion (``GroupTensors -> scores``).
        grads: ``dL/dw`` by parameter name (``gate_up_proj``, ...), for gradient criteria.
        acts: ``[E, I]`` L2 norms of what reached each expert's down projection, for activation criteria.
    """
    i, out = lay.inner, []
    for e in range(lay.experts):
        both = np.concatenate([np.arange(i), np.arange(i)])
        parts = [("gate_up_proj", 0, lay.rows(m.gate_up_proj[e]), both),
                 ("down_proj", 1, lay.rows(m.down_proj[e]), np.arange(i))]
        if lay.bias:
            parts.append(("gate_up_proj_bias", 0, m.gate_up_proj_bias[e], both))
        members = []
        for name, dim, w, position in parts:
            g = None if grads is None or name not in grads else lay.rows(grads[name][e]).movedim(dim, 0).float()
            act = acts[e].float() if acts is not None and name == "down_proj" else None
            members.append(MemberSlice(f"{name}[{e}][{dim}]", name, dim, type(m).__name__, w.detach().float(),
                                       None, position, None if g is None else g.reshape(w.shape[dim], -1), act))
        group = ChannelGroup(e, i, (f"gate_up_proj[{e}]",), tuple(s.name for s in members), 0, ())
        out.append(check_scores(criterion(GroupTensors(group, tuple(members))), e, i, criterion))
    return out


def select(scores: Sequence[np.ndarray], k: int) -> torch.Tensor:
    """``[E, k]`` kept channels (ascending) of every expert: its ``k`` best, ties broken by position."""
    kept = [np.sort(np.lexsort((np.arange(len(s)), -s))[:k]) for s in scores]
    return torch.as_tensor(np.stack(kept), dtype=torch.long)


def prune(m: nn.Module, lay: Layout, keep: torch.Tensor) -> nn.Module:
    """A new experts module keeping channels ``keep[e]`` of expert ``e``; ``m`` is left as it was.

    Every parameter of the result is a new tensor; other attributes (the config) are shared with ``m``.
    """
    new = _copy(m, share_parameters=True)  # each one is replaced below
    k, i = keep.shape[1], lay.inner
    rows = torch.cat([keep, keep + i], dim=1)  # gate rows, then up rows
    with torch.no_grad():
        gate_up = torch.stack([lay.rows(m.gate_up_proj[e])[rows[e]] for e in range(lay.experts)])
        down = torch.stack([lay.rows(m.down_proj[e])[:, keep[e]] for e in range(lay.experts)])
        tensors = {"gate_up_proj": gate_up.transpose(1, 2) if lay.transposed else gate_up,
                   "down_proj": down.transpose(1, 2) if lay.transposed else down}
        if lay.bias:
            tensors["gate_up_proj_bias"] = torch.gather(m.gate_up_proj_bias, 1, rows)
            tensors["down_proj_bias"] = m.down_proj_bias.clone()
    for name, t in tensors.items():
        setattr(new, name, nn.Parameter(t.contiguous(), requires_grad=getattr(m, name).requires_grad))
    for a in _WIDTH_ATTRS:
        if hasattr(new, a):
            setattr(new, a, k)
    return new


def masked(m: nn.Module, lay: Layout, keep: torch.Tensor) -> nn.Module:
    """A float64 copy of ``m`` with every channel not in ``keep`` zeroed (gate and up rows, down columns)."""
    out = _copy(m).double()
    drop = torch.ones(lay.experts, lay.inner, dtype=torch.bool)
    drop.scatter_(1, keep, False)
    with torch.no_grad():
        for e in range(lay.experts):
            gone = drop[e].nonzero().flatten()
            lay.rows(out.gate_up_proj[e])[torch.cat([gone, gone + lay.inner])] = 0
            lay.rows(out.down_proj[e])[:, gone] = 0
            if lay.bias:
                out.gate_up_proj_bias[e, torch.cat([gone, gone + lay.inner])] = 0
    return out


def _copy(m: nn.Module, share_parameters: bool = False) -> nn.Module:
    """A deep copy of ``m`` whose plain attributes (the config) stay shared; parameters too if asked."""
    memo = {id(v): v for v in vars(m).values() if not isinstance(v, (torch.Tensor, nn.Module, dict))}
    return copy.deepcopy(m, memo={**memo, **({id(p): p for p in m.parameters()} if share_parameters else {})})


def oracle(original: nn.Module, pruned: nn.Module, lay: Layout, keep: torch.Tensor, calls: Calls) -> float:
    """The largest float64 difference between ``pruned`` and the masked ``original`` over ``calls``.

    Raises:
        FxPruneError: a difference above the tolerance, or a module that cannot run in float64.
    """
    want_m, got_m, worst = masked(original, lay, keep), _copy(pruned).double(), 0.0

    def f64(v: Any) -> Any:
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    for args, kwargs in calls:
        args, kwargs = torch.utils._pytree.tree_map(f64, (args, kwargs))
        try:
            with torch.no_grad():
                want, got = tensors_of(want_m(*args, **kwargs)), tensors_of(got_m(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - e.g. a grouped-mm kernel that refuses float64
            raise FxPruneError(f"the experts oracle cannot run in float64 ({type(e).__name__}: {str(e)[:120]}); "
                               "load the model with experts_implementation='eager'") from e
        if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got, strict=False)):
            raise FxPruneError("experts oracle failed: the pruned module's outputs have other shapes")
        for a, b in zip(got, want, strict=True):
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            worst = max(worst, diff)
            if not diff <= _TOL * max(1.0, float(b.abs().max()) if b.numel() else 0.0):
                raise FxPruneError(f"experts oracle failed: pruned differs from the masked original by {diff:.3g}")
    return worst


def _routed(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    """``(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])`` of a call with transformers'
    experts signature, else None."""
    try:
        bound = inspect.signature(m.forward).bind(*args, **kwargs).arguments
    except TypeError:
        return None
    got = tuple(bound.get(n) for n in ("hidden_states", "top_k_index", "top_k_weights"))
    if len(bound) != 3 or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in got):
        return None
    return got  # type: ignore[return-value]


def activations(m: nn.Module, lay: Layout, calls: Calls) -> torch.Tensor:
    """``[E, I]``: per expert, the L2 norm of what reaches its down projection over the tokens routed to it.

    Raises:
        FxPruneError: a call without transformers' ``(hidden_states, top_k_index, top_k_weights)``.
    """
    sums = torch.zeros(lay.experts, lay.inner, dtype=torch.float64)
    for args, kwargs in calls:
        if (routed := _routed(m, args, kwargs)) is None:
            raise FxPruneError("activation scores of fused experts need (hidden_states, top_k_index) inputs")
        x, index = routed[0].double(), routed[1]
        with torch.no_grad():
            for e in range(lay.experts):
                tokens = (index == e).any(1)
                if tokens.any():
                    gate, up = (x[tokens] @ lay.rows(m.gate_up_proj[e]).double().T).chunk(2, dim=-1)
                    sums[e] += (m.act_fn(gate) * up).square().sum(0)
    return sums.sqrt()


def prune_experts(m: nn.Module, k: int, calls: Calls, importance: Any = "l2",
                  grads: dict[str, torch.Tensor] | None = None, calibration: Calls | None = None,
                  ) -> tuple[nn.Module, float] | None:
    """Prune every expert of ``m`` to ``k`` inner channels, proven on ``calls``; None if ``m`` is not one.

    Args:
        m: a fused-experts module (fxprune's private copy; it is not modified).
        k: the inner channels every expert keeps.
        calls: ``(args, kwargs)`` of the calls that reached ``m`` (the oracle's inputs).
        importance: a criterion name or callable (``resolve``); gradient criteria need ``grads``.
        grads: ``dL/dw`` of ``m``'s parameters by name.
        calibration: the calls of the calibration batches, for activation criteria (default ``calls``).

    Returns:
        The pruned module and the oracle's largest difference, or None when ``m`` has no known layout.

    Raises:
        FxPruneError: the oracle failed, or the criterion could not score the experts.
    """
    lay = layout(m)
    if lay is None:
        return None
    criterion = resolve("l2" if importance is None else importance, [()])
    if getattr(criterion, "needs_grad", False) and not {"gate_up_proj", "down_proj"} <= set(grads or {}):
        raise FxPruneError("gradient importance of fused experts needs their gradients from the whole model")
    acts = activations(m, lay, calibration or calls) if getattr(criterion, "needs_activations", False) else None
    keep = select(score(m, lay, criterion, grads, acts), max(1, min(k, lay.inner)))
    pruned = prune(m, lay, keep)
    return pruned, oracle(m, pruned, lay, keep, [*calls, *every_expert(m, lay, calls[:1])])


def every_expert(m: nn.Module, lay: Layout, calls: Calls) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The hidden states of ``calls`` routed to each expert in turn (weight 1): the oracle then covers the
    experts the example did not hit. Empty for calls without transformers' signature."""
    out: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    for x, index, w in filter(None, (_routed(m, a, k) for a, k in calls)):
        ones = torch.ones(x.shape[0], 1, dtype=w.dtype)
        out += [((x, torch.full_like(index[:, :1], e), ones), {}) for e in range(lay.experts)]
    return out
