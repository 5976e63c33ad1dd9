"""Training mode: what an eval-mode trace bakes away, and the caller's per-module training flags.

fxprune traces in eval mode. A forward that reads ``self.training`` (``F.dropout(x, p, self.training)``,
timm's drop-path, ``if self.training: return out, aux``) is then traced with the flag fixed to False, and the
GraphModule would silently behave as in eval mode after ``.train()``. ``torch.nn`` leaf modules (Dropout,
BatchNorm) are not affected: the GraphModule calls them, and they read their own flag at run time.

So the private copy is traced a second time in train mode, and the two graphs are compared node by node.
When they differ, a GraphModule result refuses to run in train mode with a ``TrainModeError`` that says
what to use instead (``output="module"`` keeps the user's own forward, train-mode code included).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
import torch.nn as nn

from fxprune.errors import TrainModeError

log = logging.getLogger(__name__)


def _signature(graph: fx.Graph) -> list[tuple[Any, ...]]:
    return [(n.op, n.target if n.op != "call_function" else getattr(n.target, "__qualname__", str(n.target)),
             str(n.args), str(n.kwargs)) for n in graph.nodes]


def train_mode_difference(
    work: nn.Module, gm: fx.GraphModule, leaves: Sequence[str], inputs: tuple[Any, ...], specialize: bool
) -> str:
    """Why ``work`` traced in train mode gives another graph than ``gm`` (its eval-mode trace); "" if the same.

    ``work`` is fxprune's private copy (in eval mode, and left in eval mode).
    """
    from fxprune.passes.lower import LowerMultiheadAttention
    from fxprune.passes.lower_windows import LowerWindowAttention
    from fxprune.passes.trace import trace

    work.train()
    try:
        train_gm, opaque = trace(work, leaves, len(inputs), inputs, specialize)
        # The same lowerings as the eval graph, decided in train mode: attention with dropout stays a call.
        LowerMultiheadAttention(set(opaque))(train_gm)
        LowerWindowAttention()(train_gm)
    except Exception as e:  # noqa: BLE001 - the train-mode forward does not trace: it differs
        return f"its train-mode forward cannot be traced ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    finally:
        work.eval()
    mine, theirs = _signature(gm.graph), _signature(train_gm.graph)
    if mine == theirs:
        return ""
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            node = list(train_gm.graph.nodes)[i]
            return f"in train mode the forward computes something else from node {node.format_node()}"
    return f"in train mode the graph has {len(theirs)} nodes, in eval mode {len(mine)}"


def _refuse_train_mode(module: nn.Module, args: Any) -> None:
    if module.training:
        raise TrainModeError(
            "this pruned GraphModule was traced in eval mode and your model behaves differently in train mode "
            f"({module._fxprune_train_differs}); it cannot run in train mode. Call .eval() for inference, or, "
            "to fine-tune, prune with output='module' (your own classes, train-mode code included)"
        )


def guard_train_mode(gm: nn.Module, why: str) -> None:
    """Make ``gm`` raise ``TrainModeError`` when it is called in train mode (its eval graph would be wrong)."""
    gm._fxprune_train_differs = why  # type: ignore[assignment]
    gm.register_forward_pre_hook(_refuse_train_mode)
    log.warning("fxprune: %s; the GraphModule result runs in eval mode only (output='module' keeps train mode)", why)


def restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Give every module of ``model`` the training flag its namesake has in the caller's model.

    ``model.train(flag)`` would overwrite mixed states (a frozen BatchNorm in eval inside a training model).
    A module with no namesake (one fxprune created) takes the flag of its nearest ancestor that has one.
    """
    for name, m in model.named_modules():
        key = name
        while key not in flags and key:
            key = key.rpartition(".")[0]
        m.training = flags.get(key, False)
