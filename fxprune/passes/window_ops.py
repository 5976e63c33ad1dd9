"""The shape-dependent parts of shifted-window attention, as three ops the lowered graph calls.

torchvision's ``shifted_window_attention`` mixes two kinds of code: channel arithmetic (qkv Linear, heads,
attention, output Linear), which fxprune lowers into graph ops with exact rules, and window bookkeeping that
branches on the feature-map size (padding to a multiple of the window, no shift when the window covers the
map, the shifted-window mask). The bookkeeping stays Python, here, so a pruned graph keeps working at every
input size: each op reads H and W at run time, as torchvision does.

Every op is channel-wise (padding with zeros, rolls, window permutations, slicing, a mask over positions):
channel ``c`` of the output depends only on channel ``c`` of the input. ``rules/windows.py`` states that.
The ops are ``torch.fx.wrap``-ed: tracing a pruned graph again keeps them as single calls.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["window_mask", "window_partition", "window_reverse"]


def _geometry(h: int, w: int, window: list[int], shift: list[int]) -> tuple[int, int, list[int]]:
    """Padded height and width, and the shift that applies (none along a dim the window covers)."""
    pad_h = h + (window[0] - h % window[0]) % window[0]
    pad_w = w + (window[1] - w % window[1]) % window[1]
    applied = [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]
    return pad_h, pad_w, applied


def window_partition(x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * windows, window_h * window_w, C]``: pad, cyclic shift, cut into windows."""
    b, h, w, c = x.shape
    pad_h, pad_w, applied = _geometry(h, w, window, shift)
    x = F.pad(x, (0, 0, 0, pad_w - w, 0, pad_h - h))
    if sum(applied) > 0:
        x = torch.roll(x, shifts=(-applied[0], -applied[1]), dims=(1, 2))
    x = x.view(b, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_mask(attn: torch.Tensor, h: int, w: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """Add the shifted-window mask (-100 between positions from different regions) to ``[B * windows, heads, N, N]``."""
    pad_h, pad_w, applied = _geometry(h, w, window, shift)
    if sum(applied) == 0:
        return attn
    mask = attn.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -applied[0]), (-applied[0], None))
    w_slices = ((0, -window[1]), (-window[1], -applied[1]), (-applied[1], None))
    region = 0
    for hs in h_slices:
        for ws in w_slices:
            mask[hs[0] : hs[1], ws[0] : ws[1]] = region
            region += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    n = attn.shape[-1]
    out = attn.view(-1, windows, attn.shape[1], n, n) + mask.unsqueeze(1).unsqueeze(0)
    return out.view(-1, attn.shape[1], n, n)


def window_reverse(x: torch.Tensor, h: int, w: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """``[B * windows, N, C]`` -> ``[B, H, W, C]``: merge windows, undo the shift, drop the padding."""
    pad_h, pad_w, applied = _geometry(h, w, window, shift)
    c = x.shape[-1]
    x = x.view(-1, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, pad_h, pad_w, c)
    if sum(applied) > 0:
        x = torch.roll(x, shifts=(applied[0], applied[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("window_partition")
torch.fx.wrap("window_mask")
torch.fx.wrap("window_reverse")
