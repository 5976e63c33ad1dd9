"""The public entry points: ``compile``, ``prune``, ``apply`` and ``analyze``.

``prune`` and ``compile`` hand their options to ``pipeline.run``, where the whole pipeline reads top to bottom.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from fxprune import honoured
from fxprune.options import Options
from fxprune.passes.importance import Criterion
from fxprune.pipeline import run
from fxprune.plan import PruningPlan
from fxprune.replay import replay
from fxprune.results import Analysis, PruneResult
from fxprune.rules import registry
from fxprune.stages import prepare
from fxprune.validate import plan_argument

__all__ = ["Analysis", "PruneResult", "analyze", "apply", "compile", "prune"]

registry.load_builtins()  # with the import, not inside the first compile (and before fx patches anything)


def prune(
    model: nn.Module,
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    ignore: Iterable[str | type] = (),
    importance: str | Criterion | None = None,
    calibration: Iterable[Any] | None = None,
    global_ranking: bool = False,
    target_macs: float | None = None,
    target_params: float | None = None,
    ratios: Mapping[str, float] | None = None,
    group_ratios: Mapping[int, float] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    prune_heads: bool = False,
    leaves: Sequence[str] = (),
    verify: bool = False,
    onnx: str | None = None,
    onnx_opset: int = 18,
    output: str = "graph",
    partial: bool = True,
    hidden: float | None = None,
    reconstruct: bool | str = False,
) -> PruneResult:
    """Prune ``model`` and return the smaller model with its plan, counts and proof.

    The caller's model is never run, written or modified. The result runs outside any
    ``torch.inference_mode`` of the caller, so its parameters are trainable.

    Args:
        model: the model to prune (an eager ``nn.Module``).
        ratio: fraction of channels removed in every prunable coupled group, 0 <= ratio < 1.
        example_inputs: a tensor or tuple of tensors ``model`` accepts positionally; optional when fxprune
            can infer the input shape from the first layer (a ``ShapeError`` says when it cannot).
        ignore: module names (prefixes) or types whose channels stay.
        importance: "l2", "l1", "random", "bn_scale", "lamp", "activation" (activation-aware, on
            ``calibration``), a ``Taylor(batches)`` or any ``(GroupTensors) -> scores`` callable. Default:
            "activation" when ``calibration`` is given, else "l2".
        calibration: batches of model inputs (a tensor or a tuple of positional tensors each) that
            ``importance="activation"`` measures the layers' inputs on (real data: a few hundred samples).
        global_ranking: rank channels across groups instead of removing ``ratio`` of each.
        target_macs: keep this fraction of the original MACs; the ratio is searched.
        target_params: keep this fraction of the original parameters; the ratio is searched.
        ratios: per-module ratios (``{"layer4": 0.7}``), applied to the groups those modules produce.
        group_ratios: per-group ratios, by group id (``fxprune.analyze(...).table()`` lists them).
        round_to: kept channel counts are multiples of this.
        min_channels: every group keeps at least this many channels.
        prune_heads: remove whole attention heads (grouped-query aware) instead of thinning every head.
        leaves: submodules kept opaque (one call in the graph; their channels stay).
        verify: run the mask-equivalence oracle (float64) and raise ``InvariantError`` if it fails.
        onnx: path of a verified, simplified ONNX file to write (checked to be writable before any work).
        onnx_opset: its opset.
        output: "graph" (a ``torch.fx.GraphModule``, the default) or "module" (a copy of your own module
            tree with the pruned weights, picklable as your classes, proven equal to the graph).
        partial: prune traceable parts one by one when the whole model cannot be traced.
        hidden: fraction of the hidden size (the residual stream of a language model: embeddings, norms,
            every projection reading or writing it, ``lm_head``) removed, 0 <= hidden < 1, with one channel
            selection, before ``ratio`` prunes heads and MLPs; None (default) keeps it. The Hugging Face
            config follows (docs/hidden-size.md).
        reconstruct: refit the kept input columns (and the bias, where there is one) of every linear
            consumer of removed channels, and of every linear layer that runs after one (its input changed),
            by least squares on ``calibration`` (required), so each layer computes on the batches what it
            did before pruning; proven by the oracle like the rest
            (``PruneResult.reconstruction`` has each layer's calibration error before and after).
            ``"bias"``: also give the layers a bias where the Hugging Face config can describe one
            (``mlp_bias``, and ``attention_bias`` with ``prune_heads``), zero except where the refit
            compensates the removed inputs' mean into it (FLAP); the result reloads with ``from_pretrained``
            (``fxprune/config_bias.py``).

    Returns:
        A ``PruneResult``: ``model``, ``plan``, parameter and MAC counts before and after, the oracle's
        report, the seconds taken and, for piecewise pruning, one report per part.

    Raises:
        ArgumentError: a bad option (also a ``ValueError``), named with what to pass instead.
        TraceError: the model cannot be traced, even piecewise.
        ShapeError: the model does not run on the example inputs.
        InvariantError: a proof failed (a bug in fxprune: the message names the node).
    """
    options = Options(
        ratio=ratio, example_inputs=example_inputs, ignore=tuple(ignore), importance=importance,
        calibration=calibration, global_ranking=global_ranking, target_macs=target_macs,
        target_params=target_params, ratios=ratios, group_ratios=group_ratios, round_to=round_to,
        min_channels=min_channels, prune_heads=prune_heads, leaves=tuple(leaves), verify=verify, onnx=onnx,
        onnx_opset=onnx_opset, output=output, partial=partial, hidden=hidden, reconstruct=reconstruct,
    )
    heads = honoured.snapshot(model) if prune_heads else {}  # only a head request is judged by them
    honoured.warn_weight_only_language_model(model, options)
    if reconstruct == "bias":  # biases the config can describe, to compensate into (fxprune/config_bias.py)
        from fxprune.config_bias import with_config_biases

        options = options.checked()  # calibration read once (a generator): the first batch stands in for inputs
        example = options.example_inputs if options.example_inputs is not None else options.calibration[0]
        example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
        model, _ = with_config_biases(model, example, bool(prune_heads))
    result = run(model, options)
    return honoured.report(model, options, result, heads)  # a request that did nothing is said, by default


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module,
    ratio: float = 0.5,
    *,
    example_inputs: Any = None,
    ignore: Iterable[str | type] = (),
    importance: str | Criterion | None = None,
    calibration: Iterable[Any] | None = None,
    global_ranking: bool = False,
    target_macs: float | None = None,
    target_params: float | None = None,
    ratios: Mapping[str, float] | None = None,
    group_ratios: Mapping[int, float] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    prune_heads: bool = False,
    leaves: Sequence[str] = (),
    verify: bool = False,
    onnx: str | None = None,
    onnx_opset: int = 18,
    output: str = "graph",
    partial: bool = True,
    hidden: float | None = None,
    reconstruct: bool | str = False,
) -> nn.Module:
    """Return a physically smaller, dense copy of ``model`` with ``ratio`` of each coupled group's channels
    removed: ``prune(...).model``. The arguments are ``prune``'s.

    Returns:
        A ``torch.fx.GraphModule`` (or your own classes with ``output="module"``) with the same call
        signature, output structure and parameter names.
    """
    return prune(model, ratio, example_inputs=example_inputs, ignore=ignore, importance=importance,
                 calibration=calibration, global_ranking=global_ranking, target_macs=target_macs,
                 target_params=target_params, ratios=ratios, group_ratios=group_ratios, round_to=round_to, min_channels=min_channels, prune_heads=prune_heads,
                 leaves=leaves, verify=verify, onnx=onnx, onnx_opset=onnx_opset, output=output,
                 partial=partial, hidden=hidden, reconstruct=reconstruct).model


def apply(
    model: nn.Module,
    plan: PruningPlan | str,
    example_inputs: Any = None,
    *,
    ignore: Iterable[str | type] = (),
    leaves: Sequence[str] = (),
    verify: bool = False,
) -> nn.Module:
    """Replay a saved plan on a fresh instance of the model it was made for (``fxprune/replay.py``).

    The result has exactly the pruned shapes, so ``load_state_dict`` accepts the pruned weights: a
    ``GraphModule`` of the root, with the parts pruned piecewise (a Hugging Face model's layers) replayed by
    their own recorded plans, or the model's own class when its root could not be traced. Without
    ``example_inputs``, inputs of the shapes and dtypes recorded in the plan are used.

    Raises:
        PlanMismatchError: the model differs from the planned one; names the first differing group.
        ArgumentError: the plan holds choices a replay cannot make again (``PruningPlan.pieces``: fused experts).
    """
    plan = plan_argument(plan)  # a PruningPlan, or loaded from a path (str or PathLike)
    if example_inputs is None:
        example_inputs = plan.example_inputs()  # the shapes and dtypes the plan was made with
    return replay(model, plan, example_inputs, tuple(ignore), tuple(leaves), verify)


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    ignore: Iterable[str | type] = (),
    leaves: Sequence[str] = (),
    prune_heads: bool = False,
) -> Analysis:
    """Dry run: trace, propagate shapes and list the coupled channel groups. Nothing is modified.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor or tuple of tensors the model accepts (optional when inferable).
        ignore: module names (prefixes) or types whose channels must stay.
        leaves: submodules to keep opaque.
        prune_heads: group attention channels by whole heads (as ``compile(..., prune_heads=True)``).
    """
    a = prepare(model, example_inputs, ignore, leaves, prune_heads=prune_heads)
    return Analysis(groups=a.groups, opaque=a.opaque, example_inputs=a.inputs, fingerprint=a.fingerprint,
                    dependencies=a.deps)
