"""The built-in traits: which ops are of a kind that a pass asks about (``registry.has_trait``).

One list per trait; ``install`` adds them to the registry's entries (``rules/builtin.py`` calls it last, so
the traits join the entries the rules made). The registry's module docstring says who reads each trait.
Functions are keyed by the function object, tensor methods by name.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from fxprune.rules.registry import register

_CONTRACTIONS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul,
                 torch.mm, torch.bmm, torch.addmm, torch.einsum, F.conv_transpose1d, F.conv_transpose2d,
                 F.conv_transpose3d, F.scaled_dot_product_attention, operator.matmul)

TRAITS: dict[str, tuple[tuple[Any, ...], tuple[str, ...]]] = {  # trait: (functions, tensor method names)
    "attention_product": ((F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm, torch.einsum),
                          ("matmul", "bmm")),
    "head_layout": ((torch.transpose, torch.permute, torch.unbind, torch.chunk, torch.split, operator.getitem,
                     torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze),
                    ("transpose", "permute", "unbind", "chunk", "split", "contiguous", "view", "reshape", "expand",
                     "unsqueeze", "squeeze", "flatten", "repeat_interleave", "__getitem__")),
    "rotary": ((operator.mul, operator.add, operator.sub, operator.neg, torch.mul, torch.add, torch.cat, torch.neg),
               ("mul", "add", "neg", "float", "type_as", "to")),
    "contraction": (_CONTRACTIONS, ()),
    "batch_norm": ((F.batch_norm, torch.batch_norm), ()),
    "layer_norm": ((F.layer_norm, torch.layer_norm), ()),
    "in_place": ((operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                  operator.ipow, operator.iand, operator.ior, operator.ixor, operator.setitem), ()),
    "residual_add": ((operator.add, operator.iadd, torch.add, torch.Tensor.add), ("add", "add_")),
    "to_python": ((), ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")),
    # The hidden-size probe (hidden_streams.py) sees ops as they run, by the name of what runs.
    "elementwise": ((), (
        "add", "sub", "mul", "div", "true_divide", "where", "pow", "rsqrt", "sqrt", "neg", "abs", "tanh",
        "sigmoid", "exp", "relu", "gelu", "silu", "dropout", "to", "float", "half", "bfloat16", "double",
        "type", "type_as", "contiguous", "clone", "detach", "masked_fill", "clamp", "clip", "erf", "softplus",
        "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
        "__truediv__", "__rtruediv__", "__itruediv__", "__pow__", "__neg__", "add_", "sub_", "mul_", "div_",
        "clamp_", "masked_fill_", "requires_grad_")),
    "stream_layout": ((), (
        "view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "expand_as", "__getitem__", "transpose",
        "permute", "cat", "concat", "stack", "narrow", "select", "split", "chunk", "unbind", "unflatten",
        "__get__")),  # __get__: tensor properties (.data, .T)
    "reduction": ((), ("mean", "sum", "var", "std", "norm", "amax", "amin", "var_mean", "std_mean")),
    "norm": ((), ("layer_norm", "rms_norm")),  # the probe sees F.layer_norm / F.rms_norm by these names
}


def install() -> None:
    """Add every built-in trait to its ops' registry entries."""
    for trait, (functions, methods) in TRAITS.items():
        for op in (*functions, *methods):
            register(op, traits=(trait,))
