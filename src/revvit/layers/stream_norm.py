"""The end of a two-stream model, lean in memory: LayerNorm over the streams side by side, and a mean over tokens.

Written plainly, `norm(cat([Y1, Y2], -1)).mean(1)` keeps a copy of both streams for the LayerNorm's backward
and, in that backward, holds a materialised gradient of the mean (2 streams wide), the LayerNorm's input
gradient (2 wide) and its halves' copies: at the top of a reversible stack that is the peak of the whole
step (six stream-sized tensors beside the kept Y1, Y2). Here:

* `mean_tokens` hands back the mean's gradient as a broadcast view (g / N, stride 0 over tokens), which
  costs nothing;
* `norm_streams` saves Y1 and Y2 themselves (no concatenated copy) and computes its backward token slice by
  token slice (a LayerNorm is per token, so this is exact), writing each stream's gradient straight into a
  buffer of its own, which the stack's top block then updates in place.

Both give the plain expressions' values bit for bit. They are the plain expressions wherever the lean
path would change more than memory: under torch.compile or a torch.func transform (grad, vmap), without
grad recording, for empty inputs, and for a norm that is not exactly `nn.LayerNorm` or carries hooks (its
own `forward` or hooks must run). `norm_streams` is once differentiable (a second derivative is refused);
pass `lean=False` where one is needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..reversible import join_streams
from ..reversible.hooks import has_hooks
from ..reversible.replay import AutocastState

__all__ = ["norm_streams", "mean_tokens"]

SLICES = 8  # token slices the backward walks (at most): its ~4 slice-sized temporaries, 2C wide, are ~1 stream
MIN_SLICE_BYTES = 2 ** 16  # below this a slice is not worth a kernel launch: small inputs go whole


def norm_streams(norm: nn.Module, y1: Tensor, y2: Tensor, lean: bool = True) -> Tensor:
    """`norm(cat([y1, y2], -1))` for (B, N, ..., C) streams. A plain `nn.LayerNorm` over the 2C features
    takes the lean path (unless `lean=False`); any other norm (or Identity) gets the concatenation."""
    lean = (lean and type(norm) is nn.LayerNorm and not has_hooks(norm) and _worth_it(y1, y2)
            and y1.ndim >= 3 and y1.shape == y2.shape and norm.normalized_shape == (2 * y1.shape[-1],))
    if not lean:
        return norm(join_streams(y1, y2))
    return _NormStreams.apply(y1, y2, norm.weight, norm.bias, norm.eps)


def mean_tokens(x: Tensor) -> Tensor:
    """`x.mean(1)`, whose backward is a broadcast view instead of a materialised (B, N, C) tensor."""
    if not _worth_it(x):
        return x.mean(dim=1)
    return _MeanTokens.apply(x)


def _worth_it(*xs: Tensor) -> bool:
    """Whether a graph is being recorded through `xs` by plain autograd (no compile, no torch.func)."""
    return (torch.is_grad_enabled() and any(x.requires_grad for x in xs) and all(x.numel() > 0 for x in xs)
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active())


class _MeanTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.mean(dim=1)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        # d mean / d x[:, n] = 1 / N for every token n: the same value for each, so one broadcast view
        return (g / ctx.shape[1]).unsqueeze(1).expand(ctx.shape)


class _NormStreams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y1: Tensor, y2: Tensor, weight, bias, eps: float) -> Tensor:
        ctx.save_for_backward(y1, y2, weight, bias)
        ctx.eps, ctx.autocast = eps, AutocastState.capture(y1.device)
        x = torch.cat([y1, y2], dim=-1)
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    @once_differentiable  # a second derivative would need the slices' graphs: refused with a clear error
    def backward(ctx, g: Tensor):
        y1, y2, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        d = [torch.empty_like(y, memory_format=torch.contiguous_format) if need[i] else None
             for i, y in enumerate((y1, y2))]
        w = weight.detach().requires_grad_(need[2]) if weight is not None else None
        b = bias.detach().requires_grad_(need[3]) if bias is not None else None
        dw = db = None
        for part in _token_slices(y1):
            c1 = y1[:, part].detach().requires_grad_(need[0])
            c2 = y2[:, part].detach().requires_grad_(need[1])
            with torch.enable_grad(), ctx.autocast.enter():
                x = torch.cat([c1, c2], dim=-1)
                out = F.layer_norm(x, x.shape[-1:], w, b, ctx.eps)
            inputs = [t for t in (c1, c2, w, b) if t is not None and t.requires_grad]
            grads = dict(zip(map(id, inputs), torch.autograd.grad(out, inputs, g[:, part])))
            del x, out
            for i, c in enumerate((c1, c2)):
                if d[i] is not None:
                    d[i][:, part] = grads[id(c)]
            if need[2]:
                dw = grads[id(w)] if dw is None else dw.add_(grads[id(w)])
            if need[3]:
                db = grads[id(b)] if db is None else db.add_(grads[id(b)])
        return d[0], d[1], dw, db, None


def _token_slices(y: Tensor) -> list[slice]:
    """Token ranges of dimension 1: SLICES of them, or fewer so that none is under MIN_SLICE_BYTES (both
    streams' slices together)."""
    n = y.shape[1]
    whole = 2 * y.numel() * y.element_size()
    count = max(1, min(SLICES, n, whole // max(1, MIN_SLICE_BYTES)))
    step = math.ceil(n / count)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]
