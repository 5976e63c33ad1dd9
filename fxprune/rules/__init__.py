"""The op-rule table: one entry per module type, function or method name.

An op with no entry pins every dim it touches and records why; fxprune never guesses "elementwise".
To add a rule for a custom op, register a function ``rule(node, ctx)`` with ``register_module_rule``,
``register_function_rule`` or ``register_method_rule`` (see docs/adding-rules.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from fxprune.passes.base import submodule
from fxprune.rules import attention, functional, windows
from fxprune.rules.common import pin_all
from fxprune.rules.context import RuleContext
from fxprune.rules.modules import MODULE_RULES, composite_rule
from fxprune.rules.tensor_ops import FUNCTION_RULES, METHOD_RULES

Rule = Callable[[fx.Node, RuleContext], None]

FUNCTION_RULES.update(attention.FUNCTIONS)
FUNCTION_RULES.update(functional.FUNCTIONS)
FUNCTION_RULES.update(windows.FUNCTIONS)  # type: ignore[arg-type]
METHOD_RULES.update(attention.METHODS)
MODULE_RULES.update(attention.MODULES)

__all__ = [
    "RuleContext",
    "Rule",
    "lookup",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
]


def register_module_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Register (or replace) the rule for a module type and its subclasses without a rule of their own."""
    MODULE_RULES[module_type] = rule


def register_function_rule(fn: object, rule: Rule) -> None:
    """Register (or replace) the rule for a function called in ``call_function`` nodes."""
    FUNCTION_RULES[fn] = rule


def register_method_rule(name: str, rule: Rule) -> None:
    """Register (or replace) the rule for a tensor method called in ``call_method`` nodes."""
    METHOD_RULES[name] = rule


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
        rule = composite_rule(mod)
        if rule is not None:
            return rule
        for t in type(mod).__mro__:
            # A subclass that overrides forward computes something else: it gets no inherited rule.
            if t in MODULE_RULES and type(mod).forward is t.forward:
                return MODULE_RULES[t]
        return _unknown(f"opaque module {type(mod).__name__} ({node.target}): no channel rule")
    if node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
        if rule is not None:
            return rule
        name = getattr(node.target, "__name__", str(node.target))
        return _unknown(f"function {name} ({node.name}): no channel rule")
    if node.op == "call_method":
        rule = METHOD_RULES.get(str(node.target))
        if rule is not None:
            return rule
        return _unknown(f"method .{node.target}() ({node.name}): no channel rule")
    raise ValueError(f"no rule lookup for {node.op} nodes")
