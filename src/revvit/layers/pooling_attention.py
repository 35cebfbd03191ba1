"""Pooling attention (MViT's "conv" mode) on 2-D and 3-D token grids.

Tokens (B, N, C) live on a grid (T, H, W) with N = T*H*W, T slowest (images: T = 1). q, k and v are
projected at full resolution, split into heads, then each is pooled *per head* by a depthwise Conv3d
over the grid (kernel k, stride s, padding k//2, no bias; its weights are shared by all heads) followed
by LayerNorm(head_dim). Pooling q by a stride downsamples the output; pooling k, v shrinks the keys the
attention has to look at. The attention may change the width: q, k, v project `dim -> dim_out`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.nn.functional as F
from timm.layers import to_3tuple
from torch import Tensor, nn

from .attention import head_rows, linear_rows, project_heads
from .linear import Linear

Grid = tuple[int, int, int]


def _triple(x: Optional[Sequence[int]]) -> tuple[int, int, int]:
    """timm's to_3tuple, with "no pooling" (None or ()) as (1, 1, 1) and a check of the length."""
    x = to_3tuple(x) if x else (1, 1, 1)
    if len(x) != 3:
        raise ValueError(f"pooling kernels and strides are (t, h, w) triples, got {x}")
    return x


def pooled_grid(grid: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> Grid:
    """The grid a Conv3d with padding kernel//2 produces: floor((n + 2*(k//2) - k) / s) + 1 per axis."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(grid, kernel, stride))  # type: ignore


def _depthwise_pool(head_dim: int, kernel: Sequence[int], stride: Sequence[int]) -> nn.Conv3d:
    """Depthwise Conv3d over (T, H, W), padding kernel//2, no bias: weight [hd, 1, kt, kh, kw]."""
    return nn.Conv3d(head_dim, head_dim, tuple(kernel), stride=tuple(stride),
                     padding=tuple(k // 2 for k in kernel), groups=head_dim, bias=False)


def _pool(x: Tensor, conv: Optional[nn.Conv3d], norm: Optional[nn.LayerNorm], grid: Grid) -> tuple[Tensor, Grid]:
    """(B, heads, N, hd) -> conv over the (T, H, W) grid per (sample, head) -> LayerNorm(hd)."""
    if conv is None:
        return x, grid
    b, heads, n, hd = x.shape
    t, h, w = grid
    if n != t * h * w:
        raise ValueError(f"{n} tokens do not fill the grid {grid} ({t * h * w} tokens)")
    x = x.reshape(b * heads, t, h, w, hd).permute(0, 4, 1, 2, 3)  # (B*heads, hd, T, H, W)
    x = conv(x)
    grid = tuple(x.shape[2:])  # type: ignore[assignment]
    x = x.reshape(b, heads, hd, -1).transpose(2, 3)  # (B, heads, N', hd)
    return norm(x), grid


class PoolingAttention(nn.Module):
    """Multi-head pooling attention, (B, N, dim) on `grid` -> (B, N', dim_out) on the Q-pooled grid.

    Parameter names follow the official release: `q, k, v` (separate) or `qkv` (fused, q|k|v along the
    output), `proj`, `pool_q/pool_k/pool_v` (depthwise Conv3d [hd, 1, kt, kh, kw]) and
    `norm_q/norm_k/norm_v` (LayerNorm(hd)). A pooling whose kernel and stride are all ones is skipped
    (no parameters); otherwise it runs, even at stride 1.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, qkv_bias: bool = True, separate_qkv: bool = True,
                 kernel_q: Sequence[int] = (), stride_q: Sequence[int] = (), kernel_kv: Sequence[int] = (),
                 stride_kv: Sequence[int] = (), proj_drop: float = 0.0):
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} is not divisible by num_heads {num_heads}")
        self.dim, self.dim_out, self.num_heads = dim, dim_out, num_heads
        self.head_dim = hd = dim_out // num_heads
        self.separate_qkv = separate_qkv
        if separate_qkv:
            self.q = Linear(dim, dim_out, bias=qkv_bias)
            self.k = Linear(dim, dim_out, bias=qkv_bias)
            self.v = Linear(dim, dim_out, bias=qkv_bias)
        else:
            self.qkv = Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

        self.kernel_q, self.stride_q = _triple(kernel_q), _triple(stride_q)
        self.kernel_kv, self.stride_kv = _triple(kernel_kv), _triple(stride_kv)
        pool_q = math.prod(self.kernel_q) > 1 or math.prod(self.stride_q) > 1
        pool_kv = math.prod(self.kernel_kv) > 1 or math.prod(self.stride_kv) > 1
        for name, on, kernel, stride in (("q", pool_q, self.kernel_q, self.stride_q),
                                         ("k", pool_kv, self.kernel_kv, self.stride_kv),
                                         ("v", pool_kv, self.kernel_kv, self.stride_kv)):
            self.add_module(f"pool_{name}", _depthwise_pool(hd, kernel, stride) if on else None)
            self.add_module(f"norm_{name}", nn.LayerNorm(hd, eps=1e-6) if on else None)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)

    def pool_like_q(self, x: Tensor, grid: Grid) -> Tensor:
        """Pool a (B, N, dim_out) tensor with the Q pooling (conv + norm) of this attention, per head.

        The stage-transition block pools its residual this way, sharing the weights.
        """
        if self.pool_q is None:
            return x
        b, _, c = x.shape
        x, _ = _pool(self._heads(x), self.pool_q, self.norm_q, grid)
        return x.transpose(1, 2).reshape(b, -1, c)

    def forward(self, x: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        b, n, _ = x.shape
        if self.separate_qkv:
            q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        else:  # (B, N, 3*dim_out) -> (3, B, heads, N, hd), q|k|v then heads along the output
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, grid_q = _pool(q, self.pool_q, self.norm_q, grid)
        k, _ = _pool(k, self.pool_k, self.norm_k, grid)
        v, _ = _pool(v, self.pool_v, self.norm_v, grid)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, as the official
        x = x.transpose(1, 2).reshape(b, q.shape[2], self.dim_out)
        return self.proj_drop(self.proj(x)), grid_q

    def forward_part(self, x: Tensor, grid: Grid, part: int, parts: int) -> Tensor:
        """The `part`-th of `parts` groups of heads' share of `forward(x, grid)[0]` (the pooling convs and
        norms act per head, so each group pools only its own heads); the shares sum to the whole."""
        b, n, _ = x.shape
        rows = head_rows(part, parts, self.num_heads, self.head_dim)
        heads = (rows.stop - rows.start) // self.head_dim
        if self.separate_qkv:
            qkv = linear_rows([self.q, self.k, self.v], x, [rows] * 3)
        else:
            qkv = linear_rows([self.qkv] * 3, x, [slice(rows.start + i * self.dim_out, rows.stop + i * self.dim_out)
                                                  for i in range(3)])
        q, k, v = (t.reshape(b, n, heads, self.head_dim).transpose(1, 2) for t in qkv)
        q, _ = _pool(q, self.pool_q, self.norm_q, grid)
        k, _ = _pool(k, self.pool_k, self.norm_k, grid)
        v, _ = _pool(v, self.pool_v, self.norm_v, grid)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(project_heads(self.proj, x.transpose(1, 2).reshape(b, q.shape[2], -1), rows))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, q=(kernel {self.kernel_q}, stride {self.stride_q}), "
                f"kv=(kernel {self.kernel_kv}, stride {self.stride_kv})")


class PoolingAttentionBranch(nn.Module):
    """F of Rev-MViT: LayerNorm -> pooling attention on a token grid; (B, N, dim) -> (B, N', dim_out).

    The reversible engine calls F with one tensor, so the grid is `grid` (the one of the construction-time
    input size) unless the caller binds another: `forward(x, grid)` (Rev-MViT binds the grid of each
    forward's input into the F its stack records, see `models.mvit.GridBlock`). `kwargs` go to
    PoolingAttention (qkv layout, pooling kernels and strides).
    """

    per_sample = True  # no batch statistics: the reversible engine may recompute it over slices of the batch

    def __init__(self, dim: int, dim_out: int, num_heads: int, grid: Grid, **kwargs):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PoolingAttention(dim, dim_out, num_heads, **kwargs)

    @property
    def max_parts(self) -> int:
        """F is a sum over its heads: the reversible engine may recompute it one group of heads at a time."""
        return self.attn.num_heads

    def forward(self, x: Tensor, grid: Optional[Grid] = None) -> Tensor:
        return self.attn(self.norm(x), self.grid if grid is None else grid)[0]

    def forward_part(self, x: Tensor, part: int, parts: int, grid: Optional[Grid] = None) -> Tensor:
        return self.attn.forward_part(self.norm(x), self.grid if grid is None else grid, part, parts)
