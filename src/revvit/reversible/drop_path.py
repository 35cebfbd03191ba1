"""DropPath inside the reversible engine: one per-sample mask per block, applied without making the masked
output whole.

A coupling adds DropPath(fn(b)) = fn(b) * mask to a stream in the forward and subtracts it in the rebuild.
Both are done a few tokens at a time (`add_dropped`), rounded exactly as the plain forward's
`a + y * mask`, so the rebuild subtracts the very values the forward added. The backward starts from the
mask's gradient (`through_drop_path`) rather than from a masked copy of fn's output.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .pieces import Piece, is_slice

__all__ = ["drop", "add_dropped", "mask_of", "through_drop_path"]

DROP_CHUNKS = 8  # y * mask made in 8 slices of the tokens: 1/8 of a stream at a time


def drop(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """DropPath with a mask drawn beforehand (None: keep everything)."""
    return x if mask is None else x * mask


def add_dropped(a: Tensor, y: Tensor, mask: Optional[Tensor], sign: int = 1, out_of_place: bool = False) -> Tensor:
    """a + sign * DropPath(y), in place on `a` unless `out_of_place`. With a mask, the product y * mask is made
    a few tokens at a time (never all of it), and rounded exactly as the plain forward's `a + y * mask`: the
    rebuild then subtracts the very values the forward added."""
    if mask is None:
        return torch.add(a, y, alpha=sign) if out_of_place else a.add_(y, alpha=sign)
    out = a.clone() if out_of_place else a
    if y.ndim < 2:
        return out.add_(y * mask, alpha=sign)
    step = -(-y.shape[1] // DROP_CHUNKS)
    for lo in range(0, y.shape[1], step):
        out[:, lo:lo + step].add_(y[:, lo:lo + step] * mask, alpha=sign)
    return out


def mask_of(mask: Optional[Tensor], piece: Piece) -> Optional[Tensor]:
    """The drop-path mask (B, 1, ..., 1) of a piece: its samples' rows for a slice of the batch."""
    return mask[piece[:1]] if mask is not None and is_slice(piece) else mask


class DropPathRoot(torch.autograd.Function):
    """The root of a coupling's backward through DropPath: d fn(b) = mask * d stream[t].

    The masked output is never made whole (see `add_dropped`): the forward returns a
    stand-in of the stream's shape and precision, an expanded scalar whose value is never read, and the
    backward scales the stream's gradient by the mask into fn's output precision (bf16 under autocast,
    rounded once, as autograd rounds x * mask's gradient)."""

    @staticmethod
    def forward(ctx, y: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.dtype = y.dtype
        return torch.empty((), dtype=mask.dtype, device=y.device).expand(y.shape)

    @staticmethod
    def backward(ctx, d: Tensor):
        return (d * ctx.saved_tensors[0]).to(ctx.dtype), None


def through_drop_path(y: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Where the backward of DropPath(y) starts (y itself without a mask)."""
    if mask is None:
        return y
    with torch.enable_grad():  # a backward runs without grad mode
        return DropPathRoot.apply(y, mask)
