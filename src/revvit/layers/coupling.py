"""What a branch needs to run the reversible engine's coupling itself, in one pass each way.

The engine adds DropPath(fn(b)) to a stream in the forward and, in the backward, takes it back out (the
rebuild) and back-propagates through fn. Its generic backward recomputes fn(b) whole with an autograd
graph first, which holds every activation of fn for the whole input at once. A branch that knows its own
structure (LayerNorm, then a sum over blocks: the MLP's hidden columns, attention's heads) can do both
in a single pass over those blocks instead (`reversible.engine`, "fused couplings")::

    forward    out += m * (P_1 + ... + P_k + bias)             P_j = block j's share of fn's output
    backward   out -= m * bias, then m * Q_l, ..., m * Q_1      Q_i = block i's share, made again
               block i's gradients made and added into `.grad` before block i-1 is made

with m the per-sample drop-path mask. The backward's blocks may be finer than the forward's (the forward
keeps no gradients and can afford larger ones): the same sum, rounded in other places. Only LayerNorm's
output, its gradient and one block's activations are alive, every product has all the rows of the batch,
and each block's share of the output and its gradients come from the same activations. Parameter
gradients go into the engine's stand-ins' `.grad` (`gradient_buffer`); a parameter without one needs no
gradient here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..reversible.hooks import has_hooks
from ..reversible.replay import gradient_buffer

__all__ = ["PreNormCoupling", "fusable", "norm_forward", "norm_backward", "scale_rows", "add_bias", "add_grad",
           "add_bias_grad"]


def fusable(b: Tensor, modules: list[nn.Module], params: list[Optional[Tensor]]) -> bool:
    """Whether a branch made of exactly `modules` may compute its coupling with its own code now: no hooks
    (the calls it bypasses would run them), nothing compiled (`module.compile()`, `compile_blocks`, or a
    `torch.compile` wrapper: their compiled calls would be bypassed), not under autocast (the branch would
    have to round as autocast does), parameters of b's precision."""
    return (not torch.is_autocast_enabled(b.device.type) and not torch.compiler.is_compiling()
            and not any(has_hooks(m) or getattr(m, "_compiled_call_impl", None) is not None
                        or "_orig_mod" in m._modules for m in modules)
            and all(p is None or p.dtype == b.dtype for p in params))


def norm_forward(norm: nn.LayerNorm, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm(b), with the per-token mean and 1/std its backward needs."""
    return torch.native_layer_norm(b, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def norm_backward(norm: nn.LayerNorm, dx: Tensor, b: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """d b from d LayerNorm(b); the weight's and bias's gradients go into their `.grad`."""
    need = [True, gradient_buffer(norm.weight) is not None, gradient_buffer(norm.bias) is not None]
    db, dw, dbias = torch.ops.aten.native_layer_norm_backward(dx, b, norm.normalized_shape, mean, rstd,
                                                               norm.weight, norm.bias, need)
    for p, g in ((norm.weight, dw), (norm.bias, dbias)):
        if g is not None:
            gradient_buffer(p).add_(g)
    return db


def scale_rows(t: Tensor, mask: Optional[Tensor], batch: int) -> Tensor:
    """t (rows of `batch` samples, one after the other) times each row's sample's mask, in place."""
    if mask is not None:
        t.view(batch, -1, t.shape[-1]).mul_(mask.reshape(batch, 1, 1))
    return t


def add_bias(out: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], sign: int = 1) -> None:
    """out += sign * mask * bias, in place (out: (B, ..., C))."""
    if bias is not None:
        out.add_(bias if mask is None else mask * bias, alpha=sign)


def add_grad(weight: Tensor, dy: Tensor, x: Tensor, rows: slice = slice(None), cols: slice = slice(None),
             bias: Optional[Tensor] = None) -> None:
    """weight.grad[rows, cols] += dY^T X and bias.grad[rows] += sum dY, in place, where wanted (dY, X: rows of
    tokens)."""
    grad = gradient_buffer(weight)
    if grad is not None:
        grad[rows, cols].addmm_(dy.t(), x)
    grad = gradient_buffer(bias)
    if grad is not None:
        grad[rows].add_(dy.sum(0))


def add_bias_grad(bias: Optional[Tensor], d: Tensor, mask: Optional[Tensor], rows: slice = slice(None)) -> None:
    """bias.grad[rows] += the sum over tokens of mask * d (d: (B, ..., C)), if wanted."""
    grad = gradient_buffer(bias)
    if grad is not None:
        per_sample = d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)
        if mask is not None:
            per_sample = per_sample * mask.reshape(-1, 1)
        grad[rows].add_(per_sample.sum(0))


class PreNormCoupling:
    """The engine's coupling protocol for a branch fn(b) = body(LayerNorm(b)) (`self.norm`, `self.body()`)
    whose body can add itself into a stream and take itself back out (`add_into(out, x, mask)`,
    `subtract_and_backprop(out, x, d, mask) -> d x`, `coupling_units(forward)`, `fusable()`).

    What the engine calls (`reversible.engine`, "fused couplings"):
    `fuses_coupling(b)`, whether it can now; `coupling_units(forward)`, what it holds in units of b's size;
    `coupling_forward(out, b, mask)`: out += mask * fn(b), without a graph; `coupling_backward(out, b, d,
    mask)`: out -= mask * fn(b) (the rebuild; out None: none), fn's parameter gradients for d out = d into
    `.grad`, and returns d b."""

    norm: nn.LayerNorm

    def body(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.body()(self.norm(x))

    def fuses_coupling(self, b: Tensor) -> bool:
        """Whether the fused pass computes what this branch's forward does, and may run now (a subclass with
        a forward of its own, or a body or norm other than the plain ones, is called instead)."""
        body = self.body()
        return (type(self).forward is PreNormCoupling.forward and type(self.norm) is nn.LayerNorm
                and body.fusable() and fusable(b, [self, *body.modules(), self.norm], list(self.parameters())))

    def coupling_units(self, forward: bool) -> float:
        return self.body().coupling_units(forward)

    def coupling_forward(self, out: Tensor, b: Tensor, mask: Optional[Tensor]) -> None:
        self.body().add_into(out, norm_forward(self.norm, b)[0], mask)

    def coupling_backward(self, out: Optional[Tensor], b: Tensor, d: Tensor, mask: Optional[Tensor]) -> Tensor:
        x, mean, rstd = norm_forward(self.norm, b)
        dx = self.body().subtract_and_backprop(out, x, d, mask)
        del x  # LayerNorm's backward reads b, its mean and 1/std
        return norm_backward(self.norm, dx, b, mean, rstd)
