"""Write a pruned GraphModule's parameters back into the private copy of the user's own module tree.

The result keeps the user's classes and Python forward (picklable, reloadable, attributes intact), which
is what checkpoint formats such as Ultralytics' need. It is only returned after its output was shown to
equal the GraphModule's on the example inputs: a forward with a size fxprune could not rewrite fails there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.errors import InvariantError
from fxprune.hf_config import config_follows
from fxprune.outputs import tensors_of
from fxprune.rules.attributes import fix_attention_attributes
from fxprune.rules.registry import fix_attributes
from fxprune.state import kept_buffers


class WriteBackError(InvariantError):
    """The user's forward disagrees with the pruned graph; ``culprit`` names the module where it failed."""

    def __init__(self, message: str, culprit: str = "", culprits: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.culprit = culprit
        self.culprits = culprits or ((culprit,) if culprit else ())


def _failing_module(work: nn.Module, tb: Any) -> str:
    """The deepest module of ``work`` whose forward is on the traceback (where a stale size was used)."""
    names = {id(m): n for n, m in work.named_modules() if n}
    culprit = ""
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            culprit = names[id(obj)]
        tb = tb.tb_next
    return culprit


def _check_lowered(work: nn.Module, gm: fx.GraphModule, source: dict[str, torch.Tensor]) -> None:
    """Modules whose computation the graph lowered (``gm.meta["fxprune_lowered"]``) and whose Python forward
    cannot follow a changed width: name them all at once, so the caller keeps them whole in one retry."""
    lowered: dict[str, str] = gm.meta.get("fxprune_lowered", {})
    culprits = []
    for owner in lowered:
        prefix = f"{owner}." if owner else ""
        for name, t in work.named_parameters(remove_duplicate=False):
            new = source.get(name)
            if name.startswith(prefix) and new is not None and new.shape != t.shape:
                culprits.append(owner)
                break
    if culprits:
        raise WriteBackError(f"{culprits[0]}: {lowered[culprits[0]]}", culprits[0], tuple(culprits))


def write_back(
    work: nn.Module, gm: fx.GraphModule, example_inputs: tuple[Any, ...], prune_heads: bool = False
) -> nn.Module:
    """Copy every parameter and buffer of ``gm`` into ``work`` by name, fix attributes, and prove equality.

    ``prune_heads`` says how attention attributes follow the new widths (see ``fix_attention_attributes``).

    Raises:
        InvariantError: the user's forward does not reproduce the pruned graph (a literal size in Python
            code that fxprune cannot rewrite); the GraphModule remains the result to use.
    """
    source = dict(gm.named_parameters(remove_duplicate=False))
    source.update(dict(gm.named_buffers(remove_duplicate=False)))
    _check_lowered(work, gm, source)
    gm_modules = {id(m) for m in gm.modules()}
    for mod_name, mod in work.named_modules(remove_duplicate=False):
        changed = False
        for store in (mod._parameters, mod._buffers):
            for attr, t in list(store.items()):
                new = source.get(f"{mod_name}.{attr}" if mod_name else attr)
                if t is not None and new is not None and new is not t:
                    store[attr] = new  # type: ignore[assignment]
                    changed = True
        if changed and id(mod) not in gm_modules:
            fix_attributes(mod, None)
    for mod in work.modules():  # containers whose attributes follow their children (Ultralytics' C2f.c)
        if id(mod) not in gm_modules and not (mod._parameters or mod._buffers):
            fix_attributes(mod, None)
    fix_attention_attributes(work, prune_heads)
    try:
        _prove_equal(work, gm, example_inputs)
    except InvariantError:
        # A forward that reads its Hugging Face config at run time (Phi-3's query width): retried once with
        # the config describing the pruned widths, kept only when the forward then equals the graph.
        if not config_follows(work, lambda: _prove_equal(work, gm, example_inputs)):
            raise
    return work


def _prove_equal(work: nn.Module, gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Raise unless ``work``'s own forward gives the pruned graph's outputs on the example inputs."""
    training = work.training
    work.eval()
    gm_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():  # each run from the same state: the graph's updates must not reach the forward's
            with kept_buffers(gm, work), torch.random.fork_rng(devices=[]):  # one seed: random draws agree
                torch.manual_seed(4321)
                want = tensors_of(gm(*example_inputs))
            with kept_buffers(gm, work), torch.random.fork_rng(devices=[]):
                torch.manual_seed(4321)
                got = tensors_of(work(*example_inputs))
    except Exception as e:
        culprit = _failing_module(work, e.__traceback__)
        raise WriteBackError(
            f"the original forward does not run on the pruned weights ({type(e).__name__}: {e})"
            + (f" in {culprit}" if culprit else ""),
            culprit,
        ) from e
    finally:
        work.train(training)
        gm.train(gm_training)
    if len(want) != len(got) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(want, got, strict=False)):
        raise InvariantError("the original forward disagrees with the pruned graph (a size in its Python code was not rewritten)")


def repeats_of(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` and the same module in every other repeat of each enclosing ModuleList/Sequential block:
    ``layers.0.attn.o`` -> ``layers.0.attn.o``, ``layers.1.attn.o``, ... where each exists with the same type."""
    out: list[str] = []
    for name in names:
        kind = type(model.get_submodule(name))
        found = [name.split(".")]
        for i, part in enumerate(name.split(".")):
            if not part.isdigit():
                continue
            grown = []
            for parts in found:
                block = model.get_submodule(".".join(parts[:i]))
                if not isinstance(block, (nn.ModuleList, nn.Sequential)):
                    grown.append(parts)
                    continue
                grown += [[*parts[:i], str(k), *parts[i + 1:]] for k in range(len(block))]
            found = grown
        for parts in found:
            candidate = ".".join(parts)
            try:
                same = type(model.get_submodule(candidate)) is kind
            except AttributeError:
                same = False
            if same and candidate not in out:
                out.append(candidate)
    return out
