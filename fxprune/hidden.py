"""Prune the hidden size (the residual stream) of a language model, as Minitron's width pruning does.

    small = fxprune.compile(llama, ratio=0.5, hidden=0.5, example_inputs=(ids,), prune_heads=True)

One selection of hidden channels is applied to every parameter dim the residual stream indexes: the token,
position and token-type embeddings, every norm's weight and bias, the input dim of every projection that
reads the stream (q/k/v, gate/up, fc1, ``c_attn``, the pooler, ``lm_head``) and the output dim of every one
that writes it (o/down projections, ``c_proj``). Those dims are *found*, not named: ``hidden_streams`` runs
the model once and follows the hidden dim through its ops. Heads and key/value heads are not touched
(grouped-query attention stays as it was); a tied embedding and ``lm_head`` are one tensor, sliced once.

Layers whose width the config derives from ``hidden_size`` but which do not carry the residual (BERT's
pooler and masked-LM transform) are found by building the model from the new config on the meta device,
followed as streams of their own and pruned to the same width, so ``save_pretrained`` then ``from_pretrained``
gives back the pruned model (``hidden_config``). ``pipeline.run`` calls ``hidden_stage`` when the
``hidden`` option is set: this pass first, then heads and MLPs on its result.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from fxprune.copying import private_copy
from fxprune.errors import ArgumentError, InvariantError, PlanMismatchError
from fxprune.hidden_config import (
    HIDDEN_FIELDS,
    derived_spaces,
    rename_hidden_attributes,
    sync_hidden_config,
)
from fxprune.hidden_oracle import both, hidden_oracle, resize_normalized_shape
from fxprune.hidden_streams import HiddenSizeError, Space, Stream, find_stream
from fxprune.metrics import count_macs, count_params
from fxprune.passes.select import Policy, lone_keep
from fxprune.rules.registry import fix_attributes
from fxprune.validate import check_hidden

if TYPE_CHECKING:
    from fxprune.options import Options
    from fxprune.results import PruneResult

log = logging.getLogger(__name__)

__all__ = ["HiddenPlan", "HiddenResult", "HiddenSizeError", "prune_hidden", "hidden_stage", "finish_hidden", "replay_hidden"]


@dataclass(frozen=True)
class HiddenPlan:
    """The channels kept, per stream: the residual stream first, then those the config sizes with it.

    Attributes:
        streams: the streams found (each lists the parameter dims it indexes).
        kept: for each stream, the kept channel positions, ascending.
        config_modules: modules off the residual stream whose width the config derives from the hidden size
            (BERT's pooler and masked-LM transform): pruned with it, and kept at that width afterwards.
    """

    streams: tuple[Stream, ...]
    kept: tuple[tuple[int, ...], ...]
    config_modules: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """The hidden size before pruning."""
        return self.streams[0].size

    @property
    def new_size(self) -> int:
        """The hidden size after pruning."""
        return len(self.kept[0])


@dataclass(frozen=True)
class HiddenResult:
    """What ``prune_hidden`` produced: the pruned copy, its plan, counts and whether the config describes it.

    Attributes:
        model: the pruned copy (the caller's model is untouched).
        plan: the kept channels per stream.
        params_before: parameter count of the input model.
        params_after: parameter count of the result.
        config: "" when the Hugging Face config describes the result (``save_pretrained`` round-trips), else why not.
    """

    model: nn.Module
    plan: HiddenPlan
    params_before: int
    params_after: int
    config: str = ""


def default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Eight token ids the model accepts (its vocabulary read from the input embedding)."""
    vocab = _input_embedding(model).num_embeddings
    return (torch.arange(8).reshape(1, 8) * 7 % vocab,)


def _input_embedding(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        raise HiddenSizeError(f"{type(model).__name__} has no token embedding (get_input_embeddings() returned "
                              f"{type(emb).__name__}): hidden-size pruning needs a language model")
    return emb


def prune_hidden(model: nn.Module, hidden: float, *, example_inputs: Any = None, importance: str = "l2",
                 calibration: list[Any] | None = None, round_to: int | None = None,
                 min_channels: int = 1) -> HiddenResult:
    """Remove ``hidden`` of the hidden size of ``model`` (a copy) and rewrite its config to match.

    Args:
        model: a language model with a token embedding (Hugging Face ``PreTrainedModel`` or alike).
        hidden: the fraction of hidden channels removed, 0 <= hidden < 1.
        example_inputs: a tensor or tuple the model accepts positionally (default: eight token ids).
        importance: "l2" (the norm of every weight touching a channel) or "activation" (Wanda's score summed
            over the projections that read the stream, measured on ``calibration``).
        calibration: batches of model inputs (a tensor or a tuple each) for ``importance="activation"``.
        round_to: the kept hidden size is a multiple of this.
        min_channels: the hidden size kept is at least this.

    Raises:
        ArgumentError: a bad argument.
        HiddenSizeError: the model has no token embedding, or an op along its hidden dim cannot be pruned.
    """
    hidden = check_hidden(hidden)
    if importance not in ("l2", "activation") or (importance == "activation" and not calibration):
        raise ArgumentError(f"hidden-size importance must be 'l2', or 'activation' with calibration batches; "
                            f"got {importance!r}")
    inputs = _as_tuple(example_inputs) if example_inputs is not None else default_inputs(model)
    batches = [_as_tuple(b) for b in calibration] if importance == "activation" and calibration else None
    work = private_copy(model)
    plan = _prune(work, hidden, inputs, batches, round_to, min_channels)
    problem = sync_hidden_config(work, inputs, plan.size) if plan.new_size < plan.size else ""
    return HiddenResult(work, plan, count_params(model), count_params(work), problem)


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def replay_hidden(model: nn.Module, kept: tuple[tuple[int, ...], ...], inputs: tuple[Any, ...]) -> tuple[nn.Module, HiddenPlan]:
    """A private copy of ``model`` with the hidden channels of a saved plan kept (``fxprune.apply``): the
    streams are found again, the recorded selection sliced, the config rewritten.

    Raises:
        PlanMismatchError: the model's streams are not the planned ones (count or size).
    """
    work = private_copy(model)
    plan = _prune(work, 0.0, inputs, None, None, 1, kept=kept)
    if plan.new_size < plan.size:
        sync_hidden_config(work, inputs, plan.size)
    return work, plan


def _prune(work: nn.Module, hidden: float, inputs: tuple[Any, ...], calibration: list[tuple[Any, ...]] | None,
           round_to: int | None, min_channels: int, ignore: tuple[str | type, ...] = (),
           kept: tuple[tuple[int, ...], ...] | None = None) -> HiddenPlan:
    """Find the streams, score and select channels (or take ``kept``, a saved selection), slice ``work`` in
    place (a private copy)."""
    emb = _input_embedding(work)
    size = emb.embedding_dim
    keep = lone_keep(size, Policy(hidden, round_to=round_to, min_channels=min_channels)) if kept is None \
        else len(kept[0])
    if kept is None:
        keep = config_valid_keep(work, size, keep)
    seed = (next(n for n, p in work.named_parameters() if p is emb.weight), 1)
    acts: dict[Space, torch.Tensor] | None = {} if calibration else None
    residual = find_stream(work, {seed}, size, inputs, calibration, acts)
    streams = [residual, *_config_streams(work, residual, size, keep, inputs)]
    owners = {name.rsplit(".", 1)[0] for s in streams[1:] for name, _ in set(s.spaces) - set(residual.spaces)}
    _check_not_ignored(work, streams, ignore)
    # A config stream that shares a tensor dim with the residual (BERT's masked-LM transform feeding the tied
    # decoder) is the same channel space: one selection for both.
    merged = [s for s in streams[1:] if set(s.spaces) & set(residual.spaces)]
    if merged:
        spaces = set(residual.spaces).union(*(s.spaces for s in merged))
        readers = set(residual.readers).union(*(s.readers for s in merged))
        norms = set(residual.norms).union(*(s.norms for s in merged))
        streams = [Stream(size, tuple(sorted(spaces)), tuple(sorted(readers)), tuple(sorted(norms))),
                   *(s for s in streams[1:] if s not in merged)]
    if kept is None:
        tensors = dict([*work.named_parameters(), *work.named_buffers()])
        kept = tuple(_select(_scores(tensors, s, acts if i == 0 else None), keep) for i, s in enumerate(streams))
    elif len(kept) != len(streams) or any(not k or len(set(k)) != len(k) or min(k) < 0 or max(k) >= s.size
                                          for s, k in zip(streams, kept, strict=False)):
        raise PlanMismatchError(f"the plan keeps hidden channels of {len(kept)} streams, this model has "
                                f"{len(streams)} of sizes {[s.size for s in streams]}: not the planned model")
    plan = HiddenPlan(tuple(streams), kept, tuple(sorted(owners)))
    _slice(work, plan)
    renamed = rename_hidden_attributes(work, size, keep)
    try:  # the attributes renamed are read only when a module is built: the forward must still run
        with torch.no_grad():
            work(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the forward after the rename
        for attr in renamed:
            mod_name, _, name = attr.rpartition(".")
            setattr(work.get_submodule(mod_name), name, size)
        log.info("fxprune: the forward reads a hidden-size attribute (%s): kept as it was", e)
        renamed = []
        _run_at_new_size(work, inputs, size, keep)
    log.info("fxprune: hidden size %d -> %d (%d tensor dims, %d attributes)", size, keep,
             sum(len(s.spaces) for s in streams), len(renamed))
    return plan


def _run_at_new_size(work: nn.Module, inputs: tuple[Any, ...], size: int, keep: int) -> None:
    """Make the pruned copy's forward run: one that reads ``config.hidden_size`` at run time (a reshape to
    it) runs once the private copy's config says the new size; else a ``HiddenSizeError`` names the failure.
    """
    try:
        with torch.no_grad():
            work(*inputs)
        return
    except Exception as e:  # noqa: BLE001 - any failure of the forward at the new width
        first = e
    config = getattr(work, "config", None)
    fields = [f for f in HIDDEN_FIELDS if getattr(config, f, None) == size]
    for f in fields:
        setattr(config, f, keep)  # the copy's own config: synced for good at the end anyway
    try:
        with torch.no_grad():
            work(*inputs)
    except Exception as e:  # noqa: BLE001 - still failing: the model sizes something else from the width
        for f in fields:
            setattr(config, f, size)
        raise HiddenSizeError(f"{type(work).__name__}'s forward does not run at hidden size {keep} "
                              f"({type(first).__name__}: {str(first).splitlines()[0][:200]}): a size in its code "
                              "follows the hidden size and fxprune cannot rewrite it; prune without hidden=") from e
    log.info("fxprune: the forward reads config.%s at run time: set to %d", fields[0] if fields else "?", keep)


def _check_not_ignored(work: nn.Module, streams: list[Stream], ignore: tuple[str | type, ...]) -> None:
    """``ArgumentError`` when ``ignore`` keeps a module the hidden size runs through (it cannot stay whole)."""
    for stream in streams:
        for name, _ in stream.spaces:
            owner = name.rpartition(".")[0]
            mod = work.get_submodule(owner)
            hit = next((i for i in ignore if (isinstance(i, type) and isinstance(mod, i)) or
                        (isinstance(i, str) and (owner == i or owner.startswith(i + ".")))), None)
            if hit is not None:
                raise ArgumentError(f"ignore={hit!r} keeps {owner} whole, but the hidden size runs through it "
                                    f"({name}): drop it from ignore, or prune without hidden=")


def config_valid_keep(model: nn.Module, size: int, keep: int) -> int:
    """The smallest hidden size of at least ``keep`` that the model's Hugging Face config accepts.

    A config validates its architecture when it is saved (Llama: the hidden size must be a multiple of the
    head count); a width it rejects would make ``save_pretrained`` fail after the work, so the count goes up
    to the next width it accepts, with a warning. Models without a validating config keep ``keep``."""
    config = getattr(model, "config", None)
    field = next((f for f in HIDDEN_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if field is None or not callable(getattr(config, "validate", None)):
        return keep
    trial = copy.deepcopy(config)
    for n in range(keep, size + 1):
        setattr(trial, field, n)
        try:
            trial.validate()
        except Exception:  # noqa: BLE001 - any refusal of the config's own validation
            continue
        if n != keep:
            log.warning("fxprune: hidden size %d is refused by %s (its own validation); keeping %d channels",
                        keep, type(config).__name__, n)
        return n
    return keep


def _config_streams(work: nn.Module, residual: Stream, size: int, keep: int, inputs: tuple[Any, ...]) -> list[Stream]:
    """Streams of projections whose output width the config derives from the hidden size (BERT's pooler and
    masked-LM transform) but which do not write the residual; projections whose output cannot be followed
    (an attention width split into heads) are left to head pruning."""
    derived = derived_spaces(work, size, size - 1 if keep == size else keep) - set(residual.spaces)
    names = {id(t): n for n, t in [*work.named_parameters(), *work.named_buffers()]}
    found: list[Stream] = []
    for mod in work.modules():
        weight = getattr(mod, "weight", None)
        out_dim = 1 if type(mod).__name__ == "Conv1D" else 0
        if not isinstance(mod, nn.Linear) and out_dim == 0 or not isinstance(weight, torch.Tensor):
            continue
        seed = (names.get(id(weight), ""), out_dim)
        if seed not in derived or any(seed in s.spaces for s in found):
            continue
        try:
            found.append(find_stream(work, {seed}, size, inputs))
        except HiddenSizeError as e:
            log.debug("fxprune: %s is sized by the hidden size but is no stream of its own: %s", seed[0], e)
    return found


def _scores(tensors: dict[str, torch.Tensor], stream: Stream, acts: dict[Space, torch.Tensor] | None) -> torch.Tensor:
    """One score per channel: the L2 norm of every weight touching it, or (with activations) the sum over
    the stream's readers of |W[:, j]| * |x_j| (Wanda's score per channel)."""
    score = torch.zeros(stream.size, dtype=torch.float64)
    if acts:
        for name, dim in stream.readers:
            w = tensors[name].detach().double().movedim(dim, 0).reshape(stream.size, -1)
            score += w.norm(dim=1) * acts.get((name, dim), torch.zeros(stream.size)).double().sqrt()
        return score
    for name, dim in stream.spaces:
        t = tensors[name].detach().double().movedim(dim, 0).reshape(stream.size, -1)
        score += t.pow(2).sum(1)
    return score.sqrt()


def _select(score: torch.Tensor, keep: int) -> tuple[int, ...]:
    order = torch.argsort(-score, stable=True)[:keep]  # ties: the lower index stays
    return tuple(sorted(order.tolist()))


def _slice(work: nn.Module, plan: HiddenPlan) -> None:
    """Slice every stream's dims to its kept channels; a tensor shared by several modules stays one tensor."""
    tensors = dict([*work.named_parameters(), *work.named_buffers()])
    dims: dict[str, dict[int, torch.Tensor]] = {}
    for stream, kept in zip(plan.streams, plan.kept, strict=True):
        index = torch.tensor(kept, dtype=torch.long)
        for name, dim in stream.spaces:
            dims.setdefault(name, {})[dim] = index
    new: dict[int, torch.Tensor] = {}
    for name, by_dim in dims.items():
        old = tensors[name]
        t = old.detach()
        for dim, index in by_dim.items():
            t = t.index_select(dim, index.to(t.device))
        t = t.clone()
        new[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
    for mod in work.modules():
        touched = False
        for table in (mod._parameters, mod._buffers):
            for attr, value in table.items():
                if value is not None and id(value) in new:
                    table[attr] = new[id(value)]  # type: ignore[assignment]
                    touched = True
        if touched:
            fix_attributes(mod, None)  # in_features, embedding_dim, normalized_shape, Conv1D's nx/nf
    for stream, kept in zip(plan.streams, plan.kept, strict=True):  # norms with no weight to slice (OLMo's)
        for name in stream.norms:
            resize_normalized_shape(work.get_submodule(name) if name else work, stream.size, len(kept))


@dataclass(frozen=True)
class HiddenStage:
    """The hidden size pruned (``hidden_stage``), waiting for heads and MLPs on ``work``.

    Attributes:
        work: the private copy with its hidden size pruned.
        plan: the kept hidden channels.
        proof: the hidden-size oracle (None when not asked for or nothing went).
        inputs: the example inputs.
        rest: the options heads and MLPs are pruned with on ``work`` (no ``hidden``; the stream pinned).
        params_before: macs_before: the caller's model's counts.
        t0: when the stage began.
    """

    work: nn.Module
    plan: HiddenPlan
    proof: Any
    inputs: tuple[Any, ...]
    rest: Options
    params_before: int
    macs_before: int
    t0: float


def hidden_stage(model: nn.Module, options: Options) -> HiddenStage | PruneResult:
    """The ``hidden`` option of ``pipeline.run``: the hidden size first, on a private copy. Returns the whole
    result when nothing else is asked for (``ratio=0``, no ONNX), else the stage for ``pipeline.run`` to prune
    heads and MLPs on (``HiddenStage.rest``) and hand to ``finish_hidden``.

    The layers the config sizes with the hidden size (BERT's pooler and masked-LM transform) keep their new
    width in the second pass (they are added to ``ignore``)."""
    from fxprune.plan import PruningPlan, input_specs, versions
    from fxprune.results import PruneResult

    t0 = time.perf_counter()
    inputs = _as_tuple(options.example_inputs) if options.example_inputs is not None else default_inputs(model)
    calibration = options.calibration_batches()
    work = private_copy(model)
    params_before, macs_before = count_params(model), count_macs(work, inputs)
    plan = _prune(work, options.hidden or 0.0, inputs, calibration, options.round_to, options.min_channels,
                  options.ignore)
    proof = None
    if options.verify and plan.new_size < plan.size:  # this pass's own proof, before heads and MLPs change
        proof = hidden_oracle(model, work, plan, inputs)
        if proof.applicable and not proof.passed:
            raise InvariantError(f"hidden-size oracle failed: max |pruned - masked original| = "
                                 f"{proof.max_abs_diff:.3g}")
    if options.ratio == 0 and options.onnx is None:  # nothing else to prune
        if plan.new_size < plan.size:
            sync_hidden_config(work, inputs, plan.size)

        replay = PruningPlan(0.0, (), (), (), versions=versions(), inputs=input_specs(inputs), hidden=plan.kept)
        return PruneResult(work, replay, plan.new_size < plan.size, params_before,
                           count_params(work), macs_before, count_macs(work, inputs), proof,
                           time.perf_counter() - t0)
    keep_width = [m for m in plan.config_modules if m not in options.ignore]
    # hidden= alone decides the residual stream's width: a graph of the whole model would otherwise see it as
    # one more coupled group and prune it again by ratio= (the table in docs/hidden-size.md)
    pinned = tuple((name, dim, "hidden size set by hidden=") for s in plan.streams for name, dim in s.spaces)
    rest = replace(options, hidden=None, example_inputs=inputs, ignore=(*options.ignore, *keep_width), pinned=pinned)
    return HiddenStage(work, plan, proof, inputs, rest, params_before, macs_before, t0)


def finish_hidden(stage: HiddenStage, rest: PruneResult) -> PruneResult:
    """The whole result: ``rest`` (heads and MLPs pruned on ``stage.work``) with the hidden size's plan, proof
    and config."""
    plan, inputs = stage.plan, stage.inputs
    if rest.modified or plan.new_size < plan.size:
        sync_hidden_config(rest.model, inputs, plan.size)
    return replace(rest, plan=replace(rest.plan, hidden=plan.kept), oracle=both(stage.proof, rest.oracle),
                   modified=rest.modified or plan.new_size < plan.size, params_before=stage.params_before,
                   params_after=count_params(rest.model), macs_before=stage.macs_before,
                   macs_after=count_macs(rest.model, inputs), seconds=time.perf_counter() - stage.t0)
