"""Channel rules: the rule of each ``call_*`` node, from the op registry (``rules/registry.py``).

An op with no rule pins every dim it touches and records why; fxprune never guesses "elementwise".
To add an op, register its entry with ``register(op, rule=..., literals=..., ...)`` (docs/adding-rules.md);
``register_module_rule``, ``register_function_rule`` and ``register_method_rule`` register a rule alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

import fxprune.rules.builtin as builtin
from fxprune.passes.base import submodule
from fxprune.rules.common import pin_all
from fxprune.rules.context import RuleContext
from fxprune.rules.registry import OpSpec, add_loader, function_spec, method_spec, module_spec, register

add_loader(builtin.install)  # the built-in entries, registered on the first lookup (rules/builtin.py)

Rule = Callable[[fx.Node, RuleContext], None]

__all__ = [
    "OpSpec",
    "RuleContext",
    "Rule",
    "lookup",
    "register",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
]


def register_module_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Register (or replace) the rule for a module type and its subclasses that keep its ``forward``."""
    register(module_type, rule=rule)


def register_function_rule(fn: object, rule: Rule) -> None:
    """Register (or replace) the rule for a function called in ``call_function`` nodes."""
    register(fn, rule=rule)  # type: ignore[arg-type]


def register_method_rule(name: str, rule: Rule) -> None:
    """Register (or replace) the rule for a tensor method called in ``call_method`` nodes."""
    register(name, rule=rule)


def _unknown(reason: str) -> Rule:
    def rule(node: fx.Node, ctx: RuleContext) -> None:
        pin_all(node, ctx, reason)

    return rule


def _hooks(mod: nn.Module) -> str:
    """The hooks of ``mod`` that run when the GraphModule calls it (none for plain modules)."""
    kinds = [what for what, table in (("forward hooks", mod._forward_hooks), ("forward pre-hooks", mod._forward_pre_hooks))
             if table]
    return " and ".join(kinds)


def lookup(node: fx.Node, gm: fx.GraphModule) -> Rule:
    """Return the rule for a ``call_*`` node; ops without a rule get one that pins everything they touch."""
    if node.op == "call_module":
        mod = submodule(gm, str(node.target))
        if parametrize.is_parametrized(mod):
            names = ", ".join(mod.parametrizations)  # type: ignore[union-attr]
            return _unknown(f"module {node.target} has parametrized {names} (torch.nn.utils.parametrize): its "
                            "weight is computed, so its channels are kept")
        hooks = _hooks(mod)
        if hooks:  # a hook may change the module's output any way it likes: its rule no longer describes it
            return _unknown(f"module {node.target} has {hooks}: what it computes is not the module's rule")
        rule = module_spec(mod).rule  # a subclass that overrides forward inherits no rule
        if rule is not None:
            return rule
        return _unknown(f"opaque module {type(mod).__name__} ({node.target}): no channel rule")
    if node.op == "call_function":
        rule = function_spec(node.target).rule
        if rule is not None:
            return rule
        name = getattr(node.target, "__name__", str(node.target))
        return _unknown(f"function {name} ({node.name}): no channel rule")
    if node.op == "call_method":
        rule = method_spec(str(node.target)).rule
        if rule is not None:
            return rule
        return _unknown(f"method .{node.target}() ({node.name}): no channel rule")
    raise ValueError(f"no rule lookup for {node.op} nodes")
