"""The mask oracle of the hidden-size pass: the pruned copy equals the original with the removed channels zeroed.

The reference is a private copy of the original in float64 in which, for every stream of the plan:

- every tensor dim the stream indexes is zeroed at the removed channels (embeddings and every projection
  writing the stream then put zeros there, and every reader sees zeros there);
- every module normalising over the stream (``Stream.norms``: LayerNorm, RMSNorm) computes over the kept
  channels only, and gives zero at the removed ones. Its statistics over the full width would differ: the
  mean and the mean square of a vector with zeros in it are not those of its kept entries.

The pruned model, also in float64, must then give the reference's outputs: outputs of the same shape equal,
an output whose last dim is a stream's (``last_hidden_state``) equal at the kept channels and zero in the
reference at the removed ones. ``prune(..., hidden=..., verify=True)`` runs it before the heads and MLPs
are pruned (whose own oracle is the graph's).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from fxprune.copying import private_copy
from fxprune.outputs import tensors_of
from fxprune.passes.verify import OracleReport
from fxprune.rules.registry import fix_attributes

RTOL = 1e-6  # float64 on both sides: |pruned - reference| <= RTOL * max|reference| (+ ATOL)
ATOL = 1e-9

__all__ = ["both", "hidden_oracle"]


def both(first: OracleReport | None, second: OracleReport | None) -> OracleReport | None:
    """One report for two proofs in a row (the hidden size, then heads and MLPs): passed only if both did."""
    if first is None or second is None:
        return first or second
    reason = "; ".join(r for r in (first.reason, second.reason) if r)
    return OracleReport(first.applicable and second.applicable, reason,
                        max(first.max_abs_diff, second.max_abs_diff), first.passed and second.passed)


def hidden_oracle(model: nn.Module, pruned: nn.Module, plan: Any, inputs: tuple[Any, ...]) -> OracleReport:
    """Prove ``pruned`` (the hidden pass's result) equal to ``model`` with ``plan``'s removed channels zeroed.

    Args:
        model: the caller's model (only copied, never run).
        pruned: fxprune's pruned copy.
        plan: the ``fxprune.hidden.HiddenPlan`` that was applied.
        inputs: the example inputs.

    Returns:
        The report; not applicable when a stream is normalised inside a module that is more than a norm.
    """
    reference = private_copy(model).double()
    tensors = dict(reference.named_parameters(remove_duplicate=False))
    tensors.update(reference.named_buffers(remove_duplicate=False))
    for stream, kept in zip(plan.streams, plan.kept, strict=True):
        index = torch.tensor(kept, dtype=torch.long)
        removed = torch.ones(stream.size, dtype=torch.bool)
        removed[index] = False
        gone = removed.nonzero().flatten()
        with torch.no_grad():
            for name, dim in stream.spaces:
                t = tensors[name]
                if t.is_floating_point():
                    t.index_fill_(dim, gone, 0.0)
        for norm in stream.norms:
            module = reference.get_submodule(norm)
            if next(module.children(), None) is not None:
                return OracleReport(False, f"{norm} normalises the hidden size inside a module with submodules",
                                    float("nan"), False)
            _normalise_over_kept(module, norm, stream.spaces, index)
    got, want = _outputs(pruned, inputs), _outputs(reference, inputs)
    if len(got) != len(want):
        return OracleReport(False, f"the pruned model returns {len(got)} tensors, the reference {len(want)}",
                            float("nan"), False)
    worst, passed = 0.0, True
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape:
            b = _kept_part(a, b, plan)
            if b is None:
                return OracleReport(False, f"output {i} has shape {tuple(a.shape)}, the reference "
                                    f"{tuple(want[i].shape)}", float("nan"), False)
        if not a.is_floating_point():
            passed &= bool(torch.equal(a, b))
            continue
        if a.numel():
            diff = float((a - b).abs().max())
            worst = max(worst, diff)
            passed &= diff <= RTOL * float(b.abs().max()) + ATOL
    return OracleReport(True, "", worst, passed)


def _normalise_over_kept(module: nn.Module, name: str, spaces: tuple[Any, ...], index: torch.Tensor) -> None:
    """Make ``module`` (a norm of the reference) normalise over the kept channels of its input's last dim."""
    kept = copy.deepcopy(module)
    with torch.no_grad():
        for full, dim in spaces:
            owner, _, attr = full.rpartition(".")
            if owner != name:
                continue
            t = getattr(kept, attr)
            sliced = t.detach().index_select(dim, index).clone()
            if isinstance(t, nn.Parameter):
                kept._parameters[attr] = nn.Parameter(sliced, requires_grad=False)
            else:
                kept._buffers[attr] = sliced
    fix_attributes(kept, None)  # LayerNorm's normalized_shape
    resize_normalized_shape(kept, -1, len(index))  # a norm with no weight (OLMo's)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = kept(x.index_select(-1, index), *args, **kwargs)
        out = torch.zeros((*y.shape[:-1], x.shape[-1]), dtype=y.dtype, device=y.device)
        out[..., index] = y
        return out

    module.forward = forward  # type: ignore[method-assign]


def _outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    run = copy.deepcopy(model).double() if next(model.parameters()).dtype != torch.float64 else model
    args = torch.utils._pytree.tree_map_only(torch.Tensor, lambda x: x.double() if x.is_floating_point() else x,
                                             tuple(inputs))  # dicts and nested inputs too
    with torch.no_grad():
        return [t.detach() for t in tensors_of(run(*args))]


def _kept_part(pruned: torch.Tensor, reference: torch.Tensor, plan: Any) -> torch.Tensor | None:
    """The kept channels of a reference output whose last dim is a stream's (None if no stream fits, or the
    reference is not zero at the removed channels)."""
    for stream, kept in zip(plan.streams, plan.kept, strict=True):
        if reference.shape[:-1] == pruned.shape[:-1] and reference.shape[-1] == stream.size \
                and pruned.shape[-1] == len(kept):
            index = torch.tensor(kept, dtype=torch.long)
            rest = torch.ones(stream.size, dtype=torch.bool)
            rest[index] = False
            if reference[..., rest].count_nonzero():
                return None
            return reference.index_select(-1, index)
    return None


def resize_normalized_shape(module: nn.Module, size: int, new_size: int) -> None:
    """Set a norm's ``normalized_shape`` that ends in ``size`` (-1: any size) to end in ``new_size``: a norm
    with no weight (OLMo's ``F.layer_norm(x, self.normalized_shape)``) has nothing else that says its width."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list, torch.Size)) and shape and (size == -1 or tuple(shape)[-1] == size):
        module.normalized_shape = (*tuple(shape)[:-1], new_size)
