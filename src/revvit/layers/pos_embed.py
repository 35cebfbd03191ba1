"""Absolute position embeddings at another token grid (timm's `dynamic_img_size` convention).

A position embedding (1, N, C) made for the grid (T, H, W) (or (H, W)) is resampled to another grid:
bicubic over (H, W) with antialiasing, as `timm.layers.resample_abs_pos_embed` does for ViTs; a temporal
axis that changes is interpolated linearly. At the same grid it is returned unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor

__all__ = ["resample_pos_embed", "square_grid"]


def resample_pos_embed(pos: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """(1, prod(old_grid), C) -> (1, prod(new_grid), C); grids (H, W) or (T, H, W), T slowest."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos
    if len(old_grid) != len(new_grid) or pos.shape[1] != math.prod(old_grid):
        raise ValueError(f"a position embedding of {pos.shape[1]} tokens does not fit the grid {old_grid}, or "
                         f"the grids {old_grid} and {new_grid} differ in rank")
    if len(old_grid) == 2:
        return resample_abs_pos_embed(pos, list(new_grid), list(old_grid), num_prefix_tokens=0)
    (t0, h0, w0), (t1, h1, w1) = old_grid, new_grid
    c = pos.shape[-1]
    x = pos.reshape(t0, h0 * w0, c)
    if (h0, w0) != (h1, w1):  # each frame's spatial embedding as a ViT's
        x = resample_abs_pos_embed(x, [h1, w1], [h0, w0], num_prefix_tokens=0)
    if t0 != t1:  # (T, HW, C) -> (1, HW*C, T): linear along time
        flat = x.reshape(t0, -1).t().unsqueeze(0)
        x = F.interpolate(flat, size=t1, mode="linear", align_corners=False)[0].t().reshape(t1, h1 * w1, c)
    return x.reshape(1, t1 * h1 * w1, c)


def square_grid(num_tokens: int) -> tuple[int, int]:
    """The (H, W) of a square grid of `num_tokens` tokens (a classification checkpoint's); ValueError if none."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} position embeddings do not form a square grid: give the grid")
    return side, side
