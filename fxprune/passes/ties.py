"""Weight ties: every parameter the caller's model shares under several names stays shared in the result.

The single-graph rewrite keeps ties by construction (one new tensor per old tensor, given to every owner).
Piecewise pruning copies each part privately, so a tie between a part and the rest of the model (GPT-2's
``wte``/``lm_head``) would come back as two tensors: twice the parameters, and fine-tuning would move them
apart. ``retie`` restores each tie after the parts are done.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.errors import InvariantError


def tie_groups(model: nn.Module) -> list[list[str]]:
    """The names under which one parameter object is registered, for every parameter with several names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def retie(result: nn.Module, original: nn.Module) -> int:
    """Make every tie of ``original`` a tie in ``result`` again (names that ``result`` lacks are skipped).

    Returns:
        The number of names re-pointed at their group's first tensor.

    Raises:
        InvariantError: two tied names were pruned to different shapes or values (a tie broken by pruning).
    """
    tables = {name: (mod, attr) for mod_name, mod in result.named_modules(remove_duplicate=False)
              for attr in mod._parameters for name in [f"{mod_name}.{attr}" if mod_name else attr]}
    moved = 0
    for group in tie_groups(original):
        present = [n for n in group if n in tables and tables[n][0]._parameters[tables[n][1]] is not None]
        if len(present) < 2:
            continue
        first_mod, first_attr = tables[present[0]]
        keep = first_mod._parameters[first_attr]
        for name in present[1:]:
            mod, attr = tables[name]
            other = mod._parameters[attr]
            if other is keep:
                continue
            if other.shape != keep.shape or not torch.equal(other, keep):  # type: ignore[union-attr]
                raise InvariantError(
                    f"{present[0]} and {name} are one tied parameter in your model, but were pruned differently "
                    f"({tuple(keep.shape)} vs {tuple(other.shape)}); keep one of them whole with ignore=[...]"  # type: ignore[union-attr]
                )
            mod._parameters[attr] = keep
            moved += 1
    return moved
