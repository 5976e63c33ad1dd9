"""Attribute fix-ups: a module's size attributes recomputed from its sliced parameters.

Each is the ``fixup`` of a registry entry (``rules/builtin.py``) and is called as ``fixup(module, new_in)``,
where ``new_in`` is the module's new input width when the rewrite knows it, else None.
"""

from __future__ import annotations

import torch.nn as nn


def conv(m: nn.Module, new_in: int | None) -> None:
    """A conv's channel counts from its sliced weight and its new input width (depthwise stays depthwise)."""
    assert isinstance(m, nn.modules.conv._ConvNd)
    if new_in is None:
        return
    was_depthwise = m.groups == m.in_channels and m.groups > 1
    if m.transposed:
        m.out_channels = m.weight.shape[1] * m.groups
    else:
        m.out_channels = m.weight.shape[0]
        if was_depthwise:
            m.groups = new_in
    m.in_channels = new_in


def linear(m: nn.Module, new_in: int | None) -> None:
    """``nn.Linear``: features from the weight."""
    m.out_features, m.in_features = m.weight.shape


def hf_conv1d(m: nn.Module, new_in: int | None) -> None:
    """Hugging Face's ``Conv1D`` (a linear layer with its weight stored [in, out]): ``nx`` in, ``nf`` out."""
    if hasattr(m, "nf"):
        m.nf = m.weight.shape[1]
    if hasattr(m, "nx"):
        m.nx = m.weight.shape[0]


def batch_norm(m: nn.Module, new_in: int | None) -> None:
    """BatchNorm and InstanceNorm: ``num_features`` from the running statistics or the affine weight."""
    ref = m.running_mean if m.running_mean is not None else m.weight
    if ref is not None:
        m.num_features = ref.shape[0]
    elif new_in is not None:  # InstanceNorm without affine or running statistics: the input's width
        m.num_features = new_in


def group_norm(m: nn.Module, new_in: int | None) -> None:
    """``nn.GroupNorm``: ``num_channels`` from the affine parameters (the group count never changes)."""
    m.num_channels = m.weight.shape[0] if m.weight is not None else m.bias.shape[0]


def layer_norm(m: nn.Module, new_in: int | None) -> None:
    """LayerNorm and RMSNorm: ``normalized_shape`` from the affine weight (without one it keeps its dim)."""
    ref = m.weight if m.weight is not None else getattr(m, "bias", None)
    if ref is not None:
        m.normalized_shape = tuple(ref.shape)


def embedding(m: nn.Module, new_in: int | None) -> None:
    """``nn.Embedding``: ``embedding_dim`` from the table."""
    m.embedding_dim = m.weight.shape[1]


def ultralytics_c2f(m: nn.Module, new_in: int | None) -> None:
    """Ultralytics' ``C2f`` (and ``C3k2``): ``c``, the width of each half of ``cv1``'s output, which its
    export-mode ``forward_split`` splits by (training's ``forward`` uses ``chunk`` and never reads it)."""
    conv = getattr(getattr(m, "cv1", None), "conv", None)
    if isinstance(conv, nn.Conv2d) and isinstance(getattr(m, "c", None), int):
        m.c = conv.out_channels // 2


def prelu(m: nn.Module, new_in: int | None) -> None:
    """``nn.PReLU``: one slope per kept channel."""
    m.num_parameters = m.weight.shape[0]
