"""Global multi-head self-attention through `scaled_dot_product_attention`, and Rev-ViT's F branch."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear, linear_parts


def head_rows(part: int, parts: int, num_heads: int, head_dim: int) -> slice:
    """The output rows of a q/k/v projection (and input columns of `proj`) of the `part`-th of `parts`
    nearly equal groups of heads."""
    if not 0 <= part < parts <= num_heads:
        raise ValueError(f"part {part} of {parts} does not name a group of {num_heads} heads")
    lo, hi = part * num_heads // parts, (part + 1) * num_heads // parts
    return slice(lo * head_dim, hi * head_dim)


def linear_rows(layers: list[nn.Linear], x: Tensor, rows: list[slice]) -> list[Tensor]:
    """`[layer(x)[..., r] for layer, r in zip(layers, rows)]` as one matrix product over those weight rows
    only (one product: its gradient w.r.t. x is made once, not once per layer)."""
    out = linear_parts(x, [(layer.weight, layer.bias, r, slice(None)) for layer, r in zip(layers, rows)])
    return list(out.split([r.stop - r.start for r in rows], dim=-1))


def project_heads(proj: nn.Linear, x: Tensor, rows: slice) -> Tensor:
    """The share of `proj`'s output that comes from the input columns `rows` (the bias goes with the
    group that starts at column 0): summed over all groups it is `proj` of the concatenated heads."""
    return linear_parts(x, [(proj.weight, proj.bias if rows.start == 0 else None, slice(None), rows)])


class Attention(nn.Module):
    """(B, N, C) -> (B, N, C). Separate q, k, v projections (the official Rev-ViT layout) and `proj`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.k = Linear(dim, dim, bias=qkv_bias)
        self.v = Linear(dim, dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def forward_part(self, x: Tensor, part: int, parts: int) -> Tensor:
        """The contribution of the `part`-th of `parts` groups of heads: the sum over all parts is
        `forward(x)` (up to rounding), and each part only computes its own heads' q, k, v and attention."""
        b, n, _ = x.shape
        rows = head_rows(part, parts, self.num_heads, self.head_dim)
        heads = (rows.stop - rows.start) // self.head_dim
        q, k, v = (t.reshape(b, n, heads, self.head_dim).transpose(1, 2)
                   for t in linear_rows([self.q, self.k, self.v], x, [rows] * 3))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(project_heads(self.proj, x.transpose(1, 2).reshape(b, n, -1), rows))


class AttentionBranch(nn.Module):
    """F of Rev-ViT: LayerNorm -> multi-head self-attention, (B, N, D) -> (B, N, D). No residual: the
    stream adds it."""

    per_sample = True  # no batch statistics: the reversible engine may recompute it over slices of the batch

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)

    @property
    def max_parts(self) -> int:
        """F is a sum over its heads: the reversible engine may recompute it one group of heads at a time."""
        return self.attn.num_heads

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.norm(x))

    def forward_part(self, x: Tensor, part: int, parts: int) -> Tensor:
        return self.attn.forward_part(self.norm(x), part, parts)
