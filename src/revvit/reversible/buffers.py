"""Which gradient buffers the reversible backward may update in place, and a join of the two streams
that hands each its own.

A block's backward turns its output gradients (dY1, dY2) into its input gradients (dX1, dX2) in place,
so walking a block back allocates no stream-sized gradient. That is safe only for a buffer nobody else
can see. Below a stack's top block the buffers are the ones the block above handed down (the streams
between blocks are private). At the top they come from outside, and are updated in place only if
nothing else can reach them; otherwise they are copied first (`take`).
"""
from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch
from torch import Tensor

from .pieces import region, sole_user

__all__ = ["python_refs", "take", "hand_down", "add_into", "join_streams"]

Handed = tuple[weakref.ref, weakref.ref]


def python_refs(d_y1: Optional[Tensor], d_y2: Optional[Tensor]) -> tuple[int, int]:
    """Python references to the two gradients a two-output Function's backward was handed (to be called
    first thing in that backward, with its arguments)."""
    return sys.getrefcount(d_y1), sys.getrefcount(d_y2)


def take(grads: list[Optional[Tensor]], refs: tuple[int, int], handed: Optional[Handed]) -> list[Optional[Tensor]]:
    """`grads` as buffers the caller may change in place. One is used as it is if the block above handed
    it down (`handed`), or if nothing else can see it: not the other one, not a view (e.g. a half of a
    concatenation's gradient, whose other half or whole a hook may hold), contiguous, its tensor and
    storage used once, and no Python reference beyond the engine's own (`refs` above `SOLE_REFS`: a
    gradient hook kept it). Otherwise it is copied."""
    grads = list(grads)
    for i, (g, n) in enumerate(zip(grads, refs)):
        if g is None:
            continue
        from_above = handed is not None and handed[i]() is g and n <= SOLE_REFS[i]  # and no hook kept it
        unseen = (g is not grads[1 - i] and g._base is None and g.is_contiguous() and g._use_count() == 1
                  and sole_user(g) and n <= SOLE_REFS[i])
        if not (from_above or unseen):
            grads[i] = g.clone(memory_format=torch.contiguous_format)
    return grads


def hand_down(grads: list[Optional[Tensor]]) -> Handed:
    """Remember (without keeping them alive) the buffers a block returns, so the block below knows them."""
    return tuple(weakref.ref(g) if g is not None else _nothing for g in grads)


def _nothing() -> None:
    return None


def add_into(grads: list[Optional[Tensor]], s: int, d: Optional[Tensor], piece, like: Tensor,
             made_on_side_stream: bool = False) -> None:
    """grads[s] += d in place (on the slice `piece` of the batch or tokens, if it is one); a missing grads[s]
    starts as zeros shaped `like`. `made_on_side_stream`: d was made on a side CUDA stream ("parallel")
    whose work autograd has made this stream wait for; it is used and freed on this one."""
    if d is None:
        return
    if grads[s] is None:
        grads[s] = torch.zeros_like(like, memory_format=torch.contiguous_format)
    if made_on_side_stream:
        d.record_stream(torch.cuda.current_stream(d.device))
    region(grads[s], piece).add_(d)


def join_streams(y1: Tensor, y2: Tensor) -> Tensor:
    """`torch.cat([y1, y2], dim=-1)` for a head (or a fusion) that reads both streams of a reversible stack.
    cat's backward hands the streams two halves of one buffer, which the stack's top block would have to
    copy (and the buffer stays alive while it runs: four stream-sized gradients instead of two); here
    each stream gets a buffer of its own, made by autograd, which the top block updates in place."""
    if torch.is_grad_enabled() and (y1.requires_grad or y2.requires_grad):
        y1, y2 = y1 * 1.0, y2 * 1.0  # their backward: dY * 1.0, a fresh buffer per stream
    return torch.cat([y1, y2], dim=-1)


class _Probe(torch.autograd.Function):
    """A two-output Function whose backward counts the Python references to fresh gradients from autograd."""

    refs: tuple[int, int] = (0, 0)

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor):
        ctx.set_materialize_grads(False)  # as `_BlockFunction`: the count depends on it
        return x1.clone(), x2.clone()

    @staticmethod
    def backward(ctx, d_y1: Tensor, d_y2: Tensor):
        _Probe.refs = python_refs(d_y1, d_y2)
        return d_y1, d_y2


def _sole_refs() -> tuple[int, int]:
    x = torch.zeros(2, requires_grad=True)
    with torch.enable_grad():
        y1, y2 = _Probe.apply(x, x)
        torch.autograd.backward([y1 * 1.0, y2 * 1.0], [torch.ones(2), torch.ones(2)])
    return _Probe.refs


SOLE_REFS = _sole_refs()  # the references `python_refs` counts when only autograd holds the gradients
