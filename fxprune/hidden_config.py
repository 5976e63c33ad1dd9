"""The Hugging Face config of a model whose hidden size was pruned: what it derives from ``hidden_size``.

Two questions, both answered by building the model from a config on the meta device (no weights):

- ``derived_spaces``: which parameter dims a config sizes from ``hidden_size`` (the residual stream, and also
  BERT's pooler and masked-LM transform, or GPT-2's and BERT's attention width). The hidden-size pass prunes
  the ones it can follow as streams of their own, so the config can describe the result.
- ``sync_hidden_config``: the config fields that describe the pruned model (``hidden_size``/``n_embd``, and
  the head count of GPT-2-style attention, whose head dim the config derives from the hidden size), written
  through ``hf_config.sync_config``, which proves them three ways (same parameter shapes and module
  numbers in a model built from the new config, same outputs) or leaves the config as it was and says why.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from fxprune.hf_config import built_mismatch, propose, sync_config
from fxprune.hidden_streams import Space
from fxprune.outputs import tensors_of
from fxprune.rules.attributes import int_attribute

log = logging.getLogger(__name__)

HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")  # the first one a config has names its hidden size
# Module attributes that record the hidden size and are read only when the module is built.
HIDDEN_ATTRIBUTES = ("hidden_size", "embed_dim", "n_embd", "d_model")


def hidden_field(model: nn.Module) -> str | None:
    """The config field holding the hidden size, or None (no Hugging Face config)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    fields = cfg.to_dict()
    return next((f for f in HIDDEN_FIELDS if isinstance(fields.get(f), int)), None)


def _build(model: nn.Module, config: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return type(model)(config)
    except Exception as e:  # noqa: BLE001 - a config the class refuses describes nothing
        log.debug("fxprune: %s does not build from the changed config: %s", type(model).__name__, e)
        return None


def derived_spaces(model: nn.Module, size: int, new_size: int) -> set[Space]:
    """The (parameter name, dim) pairs of width ``size`` that a model built with ``hidden_size=new_size`` has
    at ``new_size``: what the config derives from the hidden size. Names are the first name of each tensor
    (a tied parameter has one). Empty without a Hugging Face config or when the class does not build."""
    field = hidden_field(model)
    if field is None or not hasattr(type(model), "config_class") or new_size == size:
        return set()
    config = copy.deepcopy(model.config)  # type: ignore[union-attr]
    setattr(config, field, new_size)
    fresh = _build(model, config)
    if fresh is None:
        return set()
    first = {id(t): n for n, t in reversed([*model.named_parameters(remove_duplicate=False),
                                            *model.named_buffers(remove_duplicate=False)])}
    tensors = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])
    built = dict([*fresh.named_parameters(remove_duplicate=False), *fresh.named_buffers(remove_duplicate=False)])
    found: set[Space] = set()
    for name, t in tensors.items():
        other = built.get(name)
        if other is None or other.dim() != t.dim():
            continue
        found.update((first[id(t)], d) for d in range(t.dim())
                     if t.shape[d] == size and other.shape[d] == new_size)
    return found


def rename_hidden_attributes(model: nn.Module, size: int, new_size: int) -> list[str]:
    """Set every module's ``hidden_size``/``embed_dim``-style int attribute that reads ``size`` to ``new_size``
    (a model built from the new config has them so; the forwards of the covered families never read them).
    Returns ``module.attribute`` for each change."""
    changed = []
    for name, mod in model.named_modules():
        for attr in HIDDEN_ATTRIBUTES:
            if int_attribute(mod, attr) == size and attr in mod.__dict__:
                setattr(mod, attr, new_size)
                changed.append(f"{name}.{attr}" if name else attr)
    return changed


# (head count attribute, head dim attribute) of attention whose config derives the head dim from the hidden
# size: GPT-2 and OPT (GPT-NeoX has no head count attribute; Llama's explicit head dim and BERT's are hf_config's).
_HEAD_PAIRS = (("num_heads", "head_dim"),)
# Config fields that equal the hidden size unless set otherwise (OPT's embedding width before ``project_in``).
_FOLLOWERS = ("word_embed_proj_dim", "embedding_size")


def _derived_head_count(model: nn.Module, hidden: int) -> int | None:
    """The head count of attention whose head dim the config derives from the hidden size, when every layer
    has the same and heads x head dim is the (pruned) hidden size."""
    counts = set()
    for m in model.modules():
        pair = next(((h, d) for a, b in _HEAD_PAIRS
                     if (h := int_attribute(m, a)) is not None and (d := int_attribute(m, b)) is not None), None)
        qkv = getattr(m, "query_key_value", None)  # GPT-NeoX: q, k and v of every head in one Linear
        if pair is None and isinstance(qkv, nn.Linear) and (d := int_attribute(m, "head_size")):
            pair = (qkv.out_features // (3 * d), d)
        if pair is not None:
            counts.add(pair)
    if len(counts) != 1:
        return None
    heads, head_dim = counts.pop()
    return heads if heads * head_dim == hidden else None


def describes(model: nn.Module, config: Any) -> str:
    """"" when a model built from ``config`` has ``model``'s parameter names and shapes and the same number
    attributes in every module (head counts, scales: Gemma's embedding scale is the root of the hidden
    size), else what differs."""
    fresh = _build(model, config)
    if fresh is None:
        return "the config does not build"
    return built_mismatch(model, fresh)


def sync_hidden_config(model: nn.Module, example_inputs: tuple[Any, ...], size_before: int) -> str:
    """Rewrite ``model.config`` in place to describe the pruned hidden size (and everything ``hf_config``
    describes: MLP widths, head counts). Returns "" when the config now describes the model, else why not
    (also logged as a warning: save the model with ``torch.save`` then).

    Proven like ``hf_config``: a model built from the new config has the pruned model's parameter shapes and
    module numbers, and the pruned model's outputs do not change with its config (Gemma scales its embeddings
    by the square root of ``config.hidden_size`` at run time: refused)."""
    field = hidden_field(model)
    if field is None or not hasattr(type(model), "config_class"):
        return ""
    cfg = model.config  # type: ignore[union-attr]
    hidden = model.get_input_embeddings().embedding_dim  # type: ignore[operator]
    extra: dict[str, Any] = {field: hidden}
    extra.update({f: hidden for f in _FOLLOWERS if getattr(cfg, f, None) == size_before})
    heads = _derived_head_count(model, hidden)
    if heads is not None and getattr(cfg, "num_attention_heads", heads) != heads:
        extra["num_attention_heads"] = heads  # GPT-2's n_head, through the config's attribute map
    proposal = copy.deepcopy(cfg)
    for k, v in {**propose(model)[0], **extra}.items():
        setattr(proposal, k, v)
    problem = describes(model, proposal)  # the shapes first: the message names what the config cannot size
    if not problem:
        old = copy.deepcopy(cfg.__dict__)
        with torch.no_grad():
            before = tensors_of(model(*example_inputs))
        for k, v in extra.items():
            setattr(cfg, k, v)
        with quiet("fxprune.hf_config"):
            why = sync_config(model, example_inputs)  # proves module numbers, writes the rest
        problem = describes(model, cfg)
        with torch.no_grad():
            after = tensors_of(model(*example_inputs))
        if not problem and not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
            problem = f"the forward reads config.{field} and changes with it"
        if problem:
            problem = "; ".join([*why, problem])
            cfg.__dict__.clear()
            cfg.__dict__.update(old)
    elif problem.startswith("a model built from it differs"):
        problem += (f"; the config derives more widths from {field} (GPT-2, BERT, OPT: the attention width), "
                    "prune whole heads with it (prune_heads=True, ratio equal to hidden)")
    if problem:
        log.warning("fxprune: the %s config cannot describe the pruned hidden size %d: %s; save it with "
                    "torch.save", type(model).__name__, hidden, problem)
    return problem


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Hold back ``logger``'s warnings (a config sync that sees half a pruned model, or one whose reasons are
    reported here)."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)
