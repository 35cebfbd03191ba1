"""How the reversible engine splits a recomputation into pieces, and the small tensor helpers it uses.

A function F or G may declare how it can be computed piece by piece:

* per sample (`per_sample = True`: output sample i depends only on input sample i, as for any layer
  without batch statistics): over slices of the batch;
* per token (`token_wise = True`: output token i depends only on input token i, e.g. an MLP; per sample
  too): over slices of the batch or of the tokens;
* a sum of parts (`max_parts > 1` and `forward_part(x, k, n)`: summed over k < n it is the whole, e.g.
  attention over groups of heads): one summand at a time.

The engine then computes and back-propagates it piece by piece, so at most one piece's activations are
alive. Slices of the batch are preferred when there are enough samples: they are contiguous, recompute
nothing twice and leave no partial sums (a part recomputes F's LayerNorm and makes a full-width output).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = ["Part", "Piece", "pieces", "fused_pieces", "is_slice", "region", "even_slices", "sole_user", "add",
           "splitting", "split_inside"]


class Part(NamedTuple):
    """The k-th of n summands of fn (`fn.forward_part(b, k, n)`)."""

    k: int
    n: int


Piece = Union[None, tuple, Part]  # None: all of fn(b); a tuple of slices: an index of b (`b[piece]`); a Part


def is_slice(piece: Piece) -> bool:
    """Whether `piece` is an index of b (samples, or tokens of every sample), not a summand."""
    return isinstance(piece, tuple) and not isinstance(piece, Part)


def region(t: Tensor, piece: Piece) -> Tensor:
    """The part of a stream-shaped `t` that `piece` reads or writes: a view `t[piece]` for a slice, all of t
    for the whole or a summand."""
    return t[piece] if is_slice(piece) else t


PIECE_UNITS = 8  # a piece's activations in the backward, in units of its share of the input: the
# recomputed MLP and attention (`_RecomputedMlp`, `_RecomputedAttention`), split inside too (`split_inside`),
# hold 7-8 (LayerNorm output, hidden layer or q, k, v and heads' outputs, one block's gradients, the input
# gradient; autograd's graph would hold 14-16.5). Without a graph (the forward) a piece holds its LayerNorm
# output, its output and either the MLP's hidden layer (activated in place) or attention's q, k, v and
# heads' output: 6-8 units, budgeted as 8.
FORWARD_UNITS = 8
AUTO_MIN_BYTES = 8 * 1024 ** 2  # not split automatically when a whole recomputation needs less
# automatic, by the first way fn allows: 2 slices of the batch (forward and backward), 3 slices of the
# tokens, 2 parts of a sum (backward only). Finer splits hold less and cost more time on a CPU, where
# smaller products run slower: quarters of the batch cost 5-9% over halves even at batch 16 (slices of 4
# images, products as large as batch 4's unsplit ones): each piece's pass over the weight gradients.
AUTO_SAMPLES, AUTO_SLICES, AUTO_PARTS = 2, 3, 2
PART_UNITS = 3  # what a summand holds whatever n: the whole input's LayerNorm output, its full-width output and
# input gradient (measured 2.4 for Rev-ViT-B, plus about half its share: finer than single samples only when
# there are many parts or few samples)
UNEVEN = 1.125  # a slice of the batch may hold this much more than its share before more slices are made


def pieces(fn, b: Tensor, chunk_bytes: Optional[int], forward: bool = False) -> list[Piece]:
    """Split fn(b) into slices of the batch (`fn.per_sample` or `fn.token_wise`), of the tokens
    (`fn.token_wise`) or summands (`fn.max_parts`), about `PIECE_UNITS * b.nbytes / chunk_bytes` of them
    (automatic, None: see AUTO_SAMPLES, none for small inputs; a budget under one piece's need, e.g. 1,
    splits as finely as fn allows); [None]: whole. The first way whose pieces fit the budget is taken (the
    batch, then the tokens, then the parts, which also hold `PART_UNITS` whatever their number), else the
    way whose finest pieces hold least. `forward`: for the forward's computation
    without a graph (`FORWARD_UNITS`), split automatically only over the batch, so that the forward rounds
    as the unsplit one does (token slices and parts are for the backward). (chunk_bytes 0, "off", is the
    caller's to honour: `_Tape.pieces` does not call this then.)"""
    token_wise, max_parts = getattr(fn, "token_wise", False), getattr(fn, "max_parts", 1)
    ways = []  # (how many pieces it allows at most, the way), in order of preference
    if (token_wise or getattr(fn, "per_sample", False)) and b.ndim >= 1 and b.shape[0] > 1:
        ways.append((b.shape[0], "samples"))
    if token_wise and b.ndim >= 2 and b.shape[1] > 1:
        ways.append((b.shape[1], "tokens"))
    if max_parts > 1:
        ways.append((max_parts, "parts"))
    if not ways:
        return [None]
    units = FORWARD_UNITS if forward else PIECE_UNITS
    if chunk_bytes is None:
        if PIECE_UNITS * b.nbytes <= AUTO_MIN_BYTES or (forward and ways[0][1] != "samples"):
            return [None]
        way = ways[0][1]
        n = {"samples": AUTO_SAMPLES, "tokens": AUTO_SLICES, "parts": AUTO_PARTS}[way]
    else:
        fitting = [(way, k) for most, way in ways if (k := _fewest(way, units, b.nbytes, chunk_bytes)) <= most]
        if fitting:
            way, n = fitting[0]
        else:  # no way meets the budget: the one that holds least at its finest (ties: the earlier way)
            n, way = min(ways, key=lambda w: _holds(w[1], units, b.nbytes, w[0]))
    if n <= 1:
        return [None]
    if way == "samples":
        return [(rows,) for rows in even_slices(b.shape[0], _enough(b.shape[0], n))]
    if way == "tokens":
        return [(slice(None), tokens) for tokens in even_slices(b.shape[1], min(n, b.shape[1]))]
    n = min(n, max_parts)
    return [Part(k, n) for k in range(n)]


FUSED_AUTO_UNITS = 3.5  # automatic: a fused coupling is computed over the whole batch when it holds at
# most this many units of its input (backward: Rev-ViT's MLP and attention with 6 or more heads 3.33, with
# the streams' 5 units a peak of 8.3; forward: at most 1 + 5/2 = 3.5 exactly, half the heads), else in
# slices of it (Rev-ViT-Ti's 3 heads, 4.7 units in the backward: halves)


def fused_pieces(fn, b: Tensor, chunk_bytes: Optional[int], forward: bool = False) -> list[Piece]:
    """How a fused coupling (`fn.coupling_forward` / `coupling_backward`, which already go through fn's hidden
    layer or heads a block at a time) is split: into slices of the batch each holding at most `chunk_bytes`
    by fn's own estimate (`fn.coupling_units(forward)` units of its share of b). Automatic (None): whole if
    it holds at most `FUSED_AUTO_UNITS` units or under AUTO_MIN_BYTES, else as few slices as hold that.
    Never finer than a sample: fused attention cannot be, and a finer MLP would not lower the peak below it."""
    units = fn.coupling_units(forward) * b.nbytes
    if chunk_bytes is None and units <= max(FUSED_AUTO_UNITS * b.nbytes, AUTO_MIN_BYTES):
        return [None]
    n = math.ceil(units / (FUSED_AUTO_UNITS * b.nbytes if chunk_bytes is None else max(chunk_bytes, 1)))
    per_sample = getattr(fn, "token_wise", False) or getattr(fn, "per_sample", False)
    if n <= 1 or not per_sample or b.ndim < 1 or b.shape[0] < 2:
        return [None]
    return [(rows,) for rows in even_slices(b.shape[0], _enough(b.shape[0], n))]


_SPLIT_INSIDE: ContextVar[bool] = ContextVar("revvit_split_inside", default=False)


@contextmanager
def splitting(on: bool) -> Iterator[None]:
    """Within the body, `split_inside()` is `on`: the engine says whether the recomputation it runs is
    split into pieces (memory is what it is saving) or whole (chunking off, or too small to be worth it)."""
    token = _SPLIT_INSIDE.set(on)
    try:
        yield
    finally:
        _SPLIT_INSIDE.reset(token)


def split_inside() -> bool:
    """Whether a layer the engine is recomputing should also work through its own activations a block at a
    time (the fused MLP and attention: less memory for a few per cent more time), because the engine
    splits this recomputation into pieces."""
    return _SPLIT_INSIDE.get()


def _fixed(way: str, nbytes: int) -> int:
    """What every piece made `way` holds whatever their number: for a summand `PART_UNITS` of the whole
    input, for a slice nothing."""
    return PART_UNITS * nbytes if way == "parts" else 0


def _holds(way: str, units: int, nbytes: int, n: int) -> float:
    """The bytes one of n pieces made `way` is estimated to hold: `units` times its share of the input, and
    its fixed share."""
    return units * nbytes / n + _fixed(way, nbytes)


def _fewest(way: str, units: int, nbytes: int, budget: int) -> int:
    """The fewest pieces made `way` that each hold at most `budget` bytes (by `_holds`); a very large number
    when none do (the fixed share alone is over it)."""
    left = budget - _fixed(way, nbytes)
    return -(-units * nbytes // left) if left > 0 else 2 ** 62


def _enough(total: int, n: int) -> int:
    """How many near-even slices of `total` rows keep each within UNEVEN of a 1/n share (n or a few more)."""
    m = min(n, total)
    while m < total and math.ceil(total / m) > UNEVEN * total / n:
        m += 1
    return m


def even_slices(total: int, n: int) -> list[slice]:
    """`total` rows (or columns) in `n` near-even contiguous slices, in order."""
    bounds = [round(i * total / n) for i in range(n + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def sole_user(t: Tensor) -> bool:
    """Whether no tensor but `t` uses its storage (it may then be overwritten in place)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= SOLE_USE_COUNT


def _use_count_of_one_tensor() -> int:
    t = torch.empty(1)  # a storage used by one tensor, counted the way `_sole_user` counts
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


SOLE_USE_COUNT = _use_count_of_one_tensor()


def add(total: Optional[Tensor], part: Optional[Tensor]) -> Optional[Tensor]:
    if total is None or part is None:
        return part if total is None else total
    return total.add_(part)
