"""Biases a Hugging Face config can describe, added for reconstruction to compensate into (``reconstruct="bias"``).

FLAP's bias compensation folds the mean contribution of the removed inputs of a layer into that layer's bias.
Llama-style models have no biases (``mlp_bias=False``, ``attention_bias=False``), so the refit has nowhere to
put it. Their configs can describe biases, though: ``mlp_bias=True`` gives ``gate_proj``, ``up_proj`` and
``down_proj`` one each, ``attention_bias=True`` the four attention projections. ``with_config_biases`` returns
a private copy with those flags set and a zero bias on every layer the flag governs, so the copy computes
exactly what the model did (checked on the example inputs) and a model built from the new config has its
parameters (checked on the meta device); then reconstruction compensates into ``down_proj`` (and ``o_proj``
when heads are pruned), and ``save_pretrained`` / ``from_pretrained`` reload it with the same logits. Zero
biases of the layers that receive no compensation stay zero: the price of a config that describes the model.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn as nn

from fxprune.copying import private_copy
from fxprune.hf_config import built_mismatch
from fxprune.outputs import tensors_of
from fxprune.state import kept_buffers

log = logging.getLogger(__name__)

# config flag -> the attribute names of the modules whose Linear children it gives a bias
_FLAGS = {"mlp_bias": ("mlp",), "attention_bias": ("self_attn", "attn", "attention")}


def with_config_biases(model: nn.Module, example_inputs: tuple[Any, ...], heads: bool) -> tuple[nn.Module, list[str]]:
    """A private copy of ``model`` with the biases its config can describe (``mlp_bias``; ``attention_bias``
    too when ``heads``, where ``o_proj`` loses inputs), all zero; and what was added or why not.

    Returns ``(model, [])`` unchanged (not copied), with a warning, when the model has no such config flag
    that is off.
    """
    config = getattr(model, "config", None)
    flags = [f for f in _FLAGS if config is not None and getattr(config, f, None) is False
             and (heads or f == "mlp_bias")]
    if not flags or not hasattr(type(model), "config_class"):  # the request adds nothing: said by default
        log.warning("fxprune: reconstruct='bias': %s has no Hugging Face config flag for biases that is off "
                    "(mlp_bias%s); refitting with the biases its layers already have", type(model).__name__,
                    ", attention_bias" if heads else "")
        return model, []
    work = private_copy(model)  # its config is its own copy, shared by its modules
    with torch.no_grad(), kept_buffers(work):  # the copy goes on to be pruned: no state left behind
        before = tensors_of(work(*example_inputs))
    new = copy.deepcopy(work.config)
    added = []
    for flag in flags:
        setattr(new, flag, True)
        for name, m in work.named_modules():
            if name.rpartition(".")[2] not in _FLAGS[flag]:
                continue
            for child, lin in m.named_children():
                if isinstance(lin, nn.Linear) and lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device))
                    added.append(f"{name}.{child}")
    try:
        with torch.device("meta"):
            fresh = type(work)(new)
        problem = built_mismatch(work, fresh)
    except Exception as e:  # noqa: BLE001 - a config that does not build does not describe the model
        problem = f"the config does not build ({type(e).__name__}: {e})"
    if not problem:
        for flag in flags:
            setattr(work.config, flag, True)
        with torch.no_grad(), kept_buffers(work):
            after = tensors_of(work(*example_inputs))
        if len(before) != len(after) or not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
            problem = "the model with zero biases computes something else"
    if problem:
        log.warning("fxprune: reconstruct='bias': %s cannot describe biases (%s); refitting without them",
                    type(model).__name__, problem)
        return model, [f"no bias added: {problem}"]
    log.info("fxprune: reconstruct='bias': %s set; zero biases added to %d layers (%s, ...)", ", ".join(flags),
             len(added), ", ".join(added[:3]))
    return work, [f"{f}=True" for f in flags]

