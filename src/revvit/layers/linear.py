"""Linear layers whose weight gradients go straight into `.grad` during a reversible recomputation.

A linear layer's weight gradient is a whole weight-sized tensor (Rev-ViT-L's MLP: 16.8 MB) made per
batch, then added to `.grad`; at a small batch it outweighs the activations. While the reversible engine
recomputes F or G, the parameters are its stand-ins (`reversible.replay.stand_ins`), whose `.grad` is the
parameter's: these layers then add `dY^T X` into (the rows and columns they use of) `.grad` in place, with
one `addmm_`, and no weight-sized gradient is ever made (under FSDP2 into the gathered parameters'
`.grad`, which FSDP then reduce-scatters). Everywhere else (plain autograd, DDP's forward, frozen
parameters, `torch.autograd.grad`, autocast, torch.compile) they are `F.linear`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reversible.replay import gradient_buffer

__all__ = ["Linear", "linear_parts", "adds_into_grad", "add_weight_grads"]

Part = tuple[Tensor, Optional[Tensor], slice, slice]  # (weight, bias, output rows, input columns)


def linear_parts(x: Tensor, parts: Sequence[Part]) -> Tensor:
    """`F.linear(x, W, b)` with W the rows `rows` and columns `cols` of each part's weight stacked along the
    output (b: the same rows of each bias; a part's bias may be None)."""
    if adds_into_grad(x, [t for w, b, _, _ in parts for t in (w, b)]):
        return _IntoGrad.apply(x, parts)
    weight, bias = _stacked(parts)
    return F.linear(x, weight, bias)


def adds_into_grad(x: Tensor, params: Sequence[Optional[Tensor]]) -> bool:
    """Whether a layer reading `x` with `params` (None: absent bias) is being recomputed by the reversible
    engine over stand-ins, and may add its parameters' gradients into their `.grad` itself."""
    return (not torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad
            and not torch.is_autocast_enabled(x.device.type)
            and all(p is None or (gradient_buffer(p) is not None and p.dtype == x.dtype) for p in params))


def add_weight_grads(weight: Tensor, bias: Optional[Tensor], dy: Tensor, x: Tensor, rows: slice = slice(None),
                     cols: slice = slice(None)) -> None:
    """weight.grad[rows, cols] += dY^T X and bias.grad[rows] += sum dY over all tokens, in place (`.grad` is
    the parameter's)."""
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    weight.grad[rows, cols].addmm_(dy.t(), x)
    if bias is not None:
        bias.grad[rows].add_(dy.sum(0))


def _stacked(parts: Sequence[Part]) -> tuple[Tensor, Optional[Tensor]]:
    whole = len(parts) == 1 and parts[0][2] == slice(None) and parts[0][3] == slice(None)
    weight = parts[0][0] if whole else torch.cat([w[rows, cols] for w, _, rows, cols in parts])
    if all(b is None for _, b, _, _ in parts):
        return weight, None
    bias = torch.cat([b[rows] if b is not None else w.new_zeros(w[rows].shape[0]) for w, b, rows, _ in parts])
    return weight, (parts[0][1] if whole else bias)


class _IntoGrad(torch.autograd.Function):
    """y = x W^T + b over stand-in parameters; backward adds dW = dy^T x and db = sum dy into `.grad`."""

    @staticmethod
    def forward(ctx, x: Tensor, parts: Sequence[Part]) -> Tensor:
        ctx.parts = parts
        weight, bias = _stacked(parts)
        ctx.save_for_backward(x)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,) = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        start = 0
        for w, b, rows, cols in ctx.parts:
            g = dy2[:, start:start + w[rows].shape[0]]
            add_weight_grads(w, b, g, x2, rows, cols)
            start += g.shape[1]
        dx = dy @ _stacked(ctx.parts)[0] if ctx.needs_input_grad[0] else None
        return dx, None


def _count_in_place_products() -> None:
    """`torch.utils.flop_counter.FlopCounterMode` counts `addmm` but not `addmm_`, which `_IntoGrad` uses for
    the weight gradients: register the same formula for it (unless torch already has one), so a
    reversible step's FLOPs include them."""
    from torch.utils import flop_counter

    if torch.ops.aten.addmm_ not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(flop_counter.addmm_flop)


_count_in_place_products()


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and init) whose weight gradient goes into `.grad` in place
    during a reversible recomputation."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_parts(x, [(self.weight, self.bias, slice(None), slice(None))])
