"""How the reversible engine splits a recomputation into pieces, and the small tensor helpers it uses.

A function F or G may declare that it is per token (`token_wise = True`: output token i depends only on
input token i, e.g. an MLP) or a sum of parts (`max_parts > 1` and `forward_part(x, k, n)`: summed over
k < n it is the whole, e.g. attention over groups of heads). The engine then computes and
back-propagates it piece by piece, so at most one piece's activations are alive.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["pieces", "sole_user", "add"]

PIECE_UNITS = 16  # a piece's activations, in units of its share of the input (measured: G 14, F 16.5)
# without a graph (the forward) a piece holds its LayerNorm output, its output and either the MLP's hidden
# layer (activated in place) or attention's q, k, v and heads' output: 6-8 units, budgeted as 8 (at 6,
# Rev-ViT-B's 4 MiB pieces peaked in the forward, 5.42 vs 5.30 MB per image). Whole, that is below the
# automatic split's backward peak (Rev-ViT-S: 2.89 MB per image with the forward whole or in three slices),
# so the forward is split only under a given budget; whole it runs the larger, faster products.
FORWARD_UNITS = 8
AUTO_MIN_BYTES = 16 * 1024 ** 2
# automatic: 3 token slices of a per-token fn, 2 parts of a sum. A part costs more time than a slice (each
# recomputes F's LayerNorm and makes a full-width output and input gradient); measured on Rev-ViT-S:
# 3 slices / 2 parts 2.89 MB per image at the step time of 2 / 2 (3.59; A/B 1.41 s vs 1.40 s), while
# 3 / 3 holds no less memory (G's slices are the peak) and costs ~1.1x.
AUTO_SLICES, AUTO_PARTS = 3, 2


def pieces(fn, b: Tensor, chunk_bytes: Optional[int], forward: bool = False) -> list:
    """Split fn(b) into token slices (`fn.token_wise`) or summands (`fn.max_parts`), about
    `PIECE_UNITS * b.nbytes / chunk_bytes` of them (automatic, None: AUTO_SLICES or AUTO_PARTS, none for
    small inputs; a budget under one piece's need, e.g. 1, splits as finely as fn allows); [None]: whole.
    `forward`: for the forward's computation without a graph, which holds far less (`FORWARD_UNITS`) and is
    never split automatically. (chunk_bytes 0, "off", is the caller's to honour: `_Tape.pieces` does not
    call this then.)"""
    token_wise, max_parts = getattr(fn, "token_wise", False), getattr(fn, "max_parts", 1)
    if not (token_wise or max_parts > 1):
        return [None]
    need = (FORWARD_UNITS if forward else PIECE_UNITS) * b.nbytes
    if chunk_bytes is None:
        if forward or need <= AUTO_MIN_BYTES:
            return [None]
        n = AUTO_SLICES if token_wise else AUTO_PARTS
    else:
        n = -(-need // max(1, chunk_bytes))
    if token_wise and b.ndim >= 2:
        n = max(1, min(n, b.shape[1]))
        bounds = [round(i * b.shape[1] / n) for i in range(n + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])] if n > 1 else [None]
    n = max(1, min(n, max_parts))
    return [(k, n) for k in range(n)] if n > 1 else [None]


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
