"""Rev-MViT's and MViT's blocks: the stage transition (with its stream fusion), the reversible block whose F
pools on the input's grid, and the twin's pre-norm residual block. `mvit.py` assembles them into models."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

from timm.layers import DropPath, drop_path
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import Grid, Mlp, MlpBranch, PoolingAttention, PoolingAttentionBranch
from ..reversible import ReversibleBlock, join_streams, records_graph
from ..reversible.hooks import recomputation
from .mvit_layout import LayerSpec, MViTConfig, parse_fusion

__all__ = ["StreamFusion", "StageTransition", "GridBlock", "MViTBlock"]


# -- blocks ---------------------------------------------------------------------------------------

def attention_options(spec: LayerSpec, cfg: MViTConfig) -> dict:
    """The PoolingAttention options of one layer."""
    return dict(qkv_bias=cfg.qkv_bias, separate_qkv=cfg.separate_qkv, kernel_q=spec.kernel_q, stride_q=spec.stride_q,
                kernel_kv=spec.kernel_kv, stride_kv=spec.stride_kv)


class StreamFusion(nn.Module):
    """Merge the two streams (B, N, C) of a reversible run before a transition.

    "avg": (X1 + X2) / 2, width C. "concat_linear_<m>": x = [X1, X2] (2C), then x + MLP(x) with hidden
    width m * 2C (the official `pre_q_fuse.fuse_fn` is our `mlp`).
    """

    def __init__(self, mode: str, dim: int):
        super().__init__()
        self.mode = mode
        mult = parse_fusion(mode)
        self.dim_out = dim if mult is None else 2 * dim
        self.mlp = None if mult is None else Mlp(2 * dim, int(2 * dim * mult), 2 * dim)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.mlp is None:
            return x1 * 0.5 + x2 * 0.5  # = (x1 + x2) / 2 exactly, each stream's gradient its own buffer
        x = join_streams(x1, x2)
        return x + self.mlp(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class StageTransition(nn.Module):
    """The non-reversible block between reversible runs: two streams (B, N, C) -> one (B, N', C_out).

        x   = fuse(X1, X2)                                  (B, N, C or 2C)
        res = pool_q(res_proj(x))    res_proj only if the width changes; pooled by the attention's own
                                     Q conv + norm (shared weights), per head
        x   = res + F(x)             F = LN -> pooling attention with Q stride, width -> C_out
        x   = x + G(x)               G = LN -> MLP
        out = DropPath(x)            on the whole block output, as in the official release

    With `recompute` (set by RevMViT's "reversible" mode) the block keeps none of its activations and
    recomputes them in backward (activation checkpointing, random draws replayed). Its inputs are the
    previous run's outputs, which reversible backprop keeps anyway, so the transitions, the largest
    activation holders of the official model (full resolution, before the Q pooling), cost no memory
    after the forward pass.
    """

    def __init__(self, spec: LayerSpec, cfg: MViTConfig):
        super().__init__()
        self.fuse = StreamFusion(cfg.pre_q_fusion, spec.dim)
        dim = self.fuse.dim_out
        self.f = PoolingAttentionBranch(dim, spec.dim_out, spec.num_heads, spec.grid, **attention_options(spec, cfg))
        self.res_proj = nn.Linear(dim, spec.dim_out) if dim != spec.dim_out else None
        self.g = MlpBranch(spec.dim_out, cfg.mlp_ratio)
        self.drop_path = spec.drop_path
        self.recompute = True
        self.nested = True

    def forward(self, x1: Tensor, x2: Tensor, grid: Optional[Grid] = None) -> Tensor:
        """`grid`: the input's token grid (None: the construction-time one); an argument, not state, so the
        recomputation in backward pools on the forward's grid."""
        grid = self.f.grid if grid is None else tuple(grid)
        if self.recompute and records_graph(self, x1, x2):
            return _recomputed(self._forward, x1, x2, grid)
        return self._forward(x1, x2, grid)

    def _forward(self, x1: Tensor, x2: Tensor, grid: Grid) -> Tensor:
        x = self._in_part(self.fuse, x1, x2)
        x = self._in_part(self._attend, x, grid)
        x = self._in_part(self._mlp, x)
        return drop_path(x, self.drop_path, self.training)

    def _attend(self, x: Tensor, grid: Grid) -> Tensor:
        res = x if self.res_proj is None else self.res_proj(x)
        return self.f.attn.pool_like_q(res, grid) + self.f(x, grid)

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.g(x)

    def _in_part(self, fn, *args):
        """fn(*args); in the recomputation of a recomputing transition, itself recomputed in its own backward
        (nested checkpointing), so the backward holds one part's activations at a time (fusion, attention,
        MLP), not the whole block's: a third of the transition's memory for one more forward of it."""
        if self.recompute and self.nested and records_graph(self, *[a for a in args if isinstance(a, Tensor)]):
            return _recomputed(fn, *args)
        return fn(*args)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}, recompute={self.recompute}"


def _recomputed(fn, *args):
    """fn(*args) under activation checkpointing, random draws replayed; its recomputation is marked as one
    (`reversible.recomputing()`), as the engine's are."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: (nullcontext(), recomputation()))


class MViTBlock(nn.Module):
    """Pre-norm MViT block on one stream, (B, N, dim) on a fixed grid -> (B, N', dim_out).

        x = pool_skip(res_proj(LN1(x)) or x) + DropPath(attn(LN1(x)))
        x = x + DropPath(MLP(LN2(x)))

    The attention does the width change and the Q pooling; the residual is projected from LN1(x) when the
    width changes and max-pooled (kernel s+1, stride s) when Q is strided, as in the official MViTv2 block.
    """

    def __init__(self, spec: LayerSpec, cfg: MViTConfig):
        super().__init__()
        self.grid = spec.grid
        self.norm1 = nn.LayerNorm(spec.dim, eps=1e-6)
        self.attn = PoolingAttention(spec.dim, spec.dim_out, spec.num_heads, **attention_options(spec, cfg))
        self.res_proj = nn.Linear(spec.dim, spec.dim_out) if spec.dim != spec.dim_out else None
        self.pool_skip = None
        if spec.stride_q and math.prod(spec.stride_q) > 1:
            kernel = [s + 1 if s > 1 else s for s in spec.stride_q]
            self.pool_skip = nn.MaxPool3d(kernel, spec.stride_q, [k // 2 for k in kernel])
        self.drop_path = DropPath(spec.drop_path) if spec.drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(spec.dim_out, eps=1e-6)
        self.mlp = Mlp(spec.dim_out, int(spec.dim_out * cfg.mlp_ratio))

    def _pool_skip(self, x: Tensor, grid: Grid) -> Tensor:
        if self.pool_skip is None:
            return x
        b, _, c = x.shape
        x = self.pool_skip(x.transpose(1, 2).reshape(b, c, *grid))
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor, grid: Optional[Grid] = None) -> Tensor:
        """`grid`: the input's token grid (None: the construction-time one)."""
        grid = self.grid if grid is None else tuple(grid)
        x_norm = self.norm1(x)
        y, _ = self.attn(x_norm, grid)
        x = self._pool_skip(x if self.res_proj is None else self.res_proj(x_norm), grid) + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _OnGrid:
    """A pooling-attention F bound to one token grid: what the reversible stack records and recomputes."""

    def __init__(self, f: PoolingAttentionBranch, grid: Grid):
        self.f, self.grid = f, grid

    @property
    def training(self) -> bool:
        return self.f.training

    def parameters(self):
        return self.f.parameters()

    def modules(self):
        return self.f.modules()

    @property
    def max_parts(self) -> int:
        return self.f.max_parts

    @property
    def per_sample(self) -> bool:
        return getattr(self.f, "per_sample", False)

    def __call__(self, x: Tensor) -> Tensor:
        return self.f(x, self.grid)

    def forward_part(self, x: Tensor, part: int, parts: int) -> Tensor:
        return self.f.forward_part(x, part, parts, self.grid)


class GridBlock(ReversibleBlock):
    """A Rev-MViT reversible block whose F pools on the grid of the current input (`grid`, set by the model
    before each run; None: F's construction-time grid).

    The grid in force when the forward runs is bound into the F the stack's tape records, so the
    recomputation in backward pools on the forward's grid even when the model has run on inputs of other
    sizes in between (two forwards of different sizes before one backward are fine).
    """

    def __init__(self, f: PoolingAttentionBranch, g: nn.Module, drop_path: float = 0.0):
        super().__init__(f, g, drop_path)
        self.grid: Optional[Grid] = None

    def couplings(self):
        return (_OnGrid(self.f, self.grid or self.f.grid), 0), (self.g, 1)
