"""Two-layer perceptron, and the G branch of the reversible blocks (LayerNorm -> MLP)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reversible.hooks import has_hooks
from ..reversible.pieces import even_slices, split_inside
from .coupling import PreNormCoupling, add_bias, add_bias_grad, add_grad, scale_rows
from .linear import Linear, add_weight_grads, adds_into_grad


class Mlp(nn.Module):
    """Linear(in, hidden) -> GELU -> Linear(hidden, out); (..., in) -> (..., out)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        plain = self._plain_gelu_mlp()
        if plain and not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            h = torch.ops.aten.gelu_(self.fc1(x), approximate=self.act.approximate)  # the hidden layer once
            return self.fc2(h)
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if plain and adds_into_grad(x, params):  # recomputed by the reversible engine
            return _RecomputedMlp.apply(x, params, self.act.approximate)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    # -- the reversible engine's coupling run by the MLP itself (see layers/coupling.py) --------------------

    def column_blocks(self, forward: bool = False) -> list[slice]:
        """The hidden layer's blocks of columns the coupling goes through. Backward: each about 2/3 of the
        output's width (Rev-ViT: 6 of 4 * D / 6), so that one block's hidden activations and their gradient
        hold what a group of a sixth of the heads does (Rev-ViT-S/B; Rev-ViT-L's group of 2 heads of 16 holds
        less, so there the MLP is the peak: 6.39 against 6.23 MB per image in 8 blocks, for fewer, larger
        products). Forward (no gradients): twice the output's width."""
        hidden, out = self.fc1.out_features, self.fc2.out_features
        per_output = 0.5 if forward else 1.5  # blocks per output width
        return even_slices(hidden, max(1, min(hidden, round(per_output * hidden / out))))

    def coupling_units(self, forward: bool) -> float:
        """What `add_into` (forward) or `subtract_and_backprop` holds, in units of its input: the input's
        LayerNorm output (and its gradient) and one block's hidden activations (and their gradient)."""
        block = max(c.stop - c.start for c in self.column_blocks(forward)) / self.fc1.in_features
        return 1 + block if forward else 2 + 2 * block

    def _hidden(self, x: Tensor, cols: slice) -> Tensor:
        """H_j = X W1[j]^T + b1[j]: the hidden columns `cols`, for every row of x."""
        bias = self.fc1.bias[cols] if self.fc1.bias is not None else None
        return F.linear(x, self.fc1.weight[cols], bias)

    def add_into(self, out: Tensor, x: Tensor, mask: Optional[Tensor]) -> None:
        """out += mask * self(x) without a graph, a block j of hidden columns at a time::

            A_j  = GELU(X W1[j]^T + b1[j])          one block of the hidden layer
            out += (mask * A_j) W2[:, j]^T          its share of the output (then out += mask * b2)
        """
        x2, o2, w2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), self.fc2.weight
        for cols in self.column_blocks(forward=True):
            a = scale_rows(torch.ops.aten.gelu_(self._hidden(x2, cols), approximate=self.act.approximate),
                           mask, x.shape[0])
            o2.addmm_(a, w2[:, cols].t())
            del a
        add_bias(out, self.fc2.bias, mask)

    def subtract_and_backprop(self, out: Optional[Tensor], x: Tensor, d: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Undo `add_into` (out -= mask * self(x); out None: nothing to undo) and back-propagate d out = d:
        the parameters' gradients go into `.grad`; returns d x. Block by block in reverse, each block's
        share of the output and its gradients made from one activation::

            H_j = X W1[j]^T + b1[j]
            dA_j = mask * (dY W2[:, j])             (the gradient of A_j)
            dH_j = GELU'(H_j) * dA_j                written over dA_j
            A_j  = mask * GELU(H_j)                 written over H_j
            out -= A_j W2[:, j]^T                   the rebuild: the product `add_into` added, made again
            dW2[:, j] += dY^T A_j,  dW1[j] += dH_j^T X,  db1[j] += sum dH_j
            dX  += dH_j W1[j]
        """
        x2, d2, batch = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1]), x.shape[0]
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        if out is not None:
            add_bias(out, self.fc2.bias, mask, sign=-1)
        add_bias_grad(self.fc2.bias, d, mask)
        dx = None
        for cols in reversed(self.column_blocks()):
            h = self._hidden(x2, cols)
            da = scale_rows(d2 @ w2[:, cols], mask, batch)
            torch.ops.aten.gelu_backward.grad_input(da, h, approximate=self.act.approximate, grad_input=da)
            a = scale_rows(torch.ops.aten.gelu_(h, approximate=self.act.approximate), mask, batch)
            if out is not None:
                out.view(-1, out.shape[-1]).addmm_(a, w2[:, cols].t(), alpha=-1)
            add_grad(w2, d2, a, cols=cols)
            del h, a
            add_grad(w1, da, x2, rows=cols, bias=b1)
            dx = da @ w1[cols] if dx is None else dx.addmm_(da, w1[cols])
            del da
        return dx.view(x.shape)

    def fusable(self) -> bool:
        return type(self).forward is Mlp.forward and self._plain_gelu_mlp()

    def _plain_gelu_mlp(self) -> bool:
        """Linear -> GELU -> Linear and nothing else (no subclass with its own forward, no dropout, no hooks):
        what the fused coupling and `_RecomputedMlp` compute, bypassing the modules' calls."""
        return (type(self.act) is nn.GELU and isinstance(self.drop, nn.Identity)
                and type(self.fc1) in (Linear, nn.Linear) and type(self.fc2) in (Linear, nn.Linear)
                and not any(has_hooks(m) for m in (self.act, self.fc1, self.fc2, self.drop)))


class _RecomputedMlp(torch.autograd.Function):
    """Y = GELU(X W1^T + b1) W2^T + b2 over the engine's stand-in parameters, keeping X and H = X W1^T + b1
    only. When the engine splits its recomputation (`split_inside`), H is worked through r blocks at a
    time, each as large as Y (r = hidden / out, an MLP's ratio): the forward makes GELU(H) for one block of
    rows at a time, the backward goes through one block j of hidden columns at a time::

        dA_j = dY W2[:, j]
        dH_j = GELU'(H_j) * dA_j                     written over dA_j
        A_j  = GELU(H_j)                             written over H_j
        dW2[:, j] += dY^T A_j                        (db2 += sum dY once)
        H_j <- dH_j                                  H's memory now holds dH
    then, whole:
        dW1 += dH^T X,  db1 += sum dH
        dX   = dH W1

    so besides H one Y-sized block is alive (autograd's graph holds H, GELU(H) and dA: three hidden-sized
    tensors; unsplit, r = 1, this holds two). Weight gradients go into `.grad` in place (`layers.linear`).
    H belongs to this Function alone (made in its forward), so it is kept on `ctx` rather than saved: the
    backward frees it before returning. One backward per forward (the engine's case).
    """

    @staticmethod
    def forward(ctx, x: Tensor, params: tuple, approximate: str) -> Tensor:
        w1, b1, w2, b2 = params
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x)
        ctx.hidden, ctx.params, ctx.approximate = h, params, approximate
        ctx.blocks = _block_count(h.shape[-1], w2.shape[0])
        y = h.new_empty(h.shape[:-1] + (w2.shape[0],))
        h2, y2 = h.view(-1, h.shape[-1]), y.view(-1, y.shape[-1])
        for rows in even_slices(h2.shape[0], max(1, min(ctx.blocks, h2.shape[0]))):  # Y[rows] = GELU(H[rows]) W2^T + b2
            a = F.gelu(h2[rows], approximate=approximate)
            if b2 is None:
                torch.mm(a, w2.t(), out=y2[rows])
            else:
                torch.addmm(b2, a, w2.t(), out=y2[rows])
            del a  # before the next block's is made
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,), h = ctx.saved_tensors, ctx.hidden
        if h is None:
            raise RuntimeError("the reversible engine's recomputed MLP was back-propagated twice (retain_graph); "
                               "its hidden layer is used up by the first backward")
        ctx.hidden = None
        w1, b1, w2, b2 = ctx.params
        dy2 = dy.contiguous().view(-1, dy.shape[-1])
        x2, h2 = x.reshape(-1, x.shape[-1]), h.view(-1, h.shape[-1])
        for j, cols in enumerate(even_slices(h2.shape[1], ctx.blocks)):
            h_j = h2[:, cols]
            d_j = dy2 @ w2[:, cols]
            torch.ops.aten.gelu_backward.grad_input(d_j, h_j, approximate=ctx.approximate, grad_input=d_j)
            torch.ops.aten.gelu_(h_j, approximate=ctx.approximate)
            add_weight_grads(w2, b2 if j == 0 else None, dy2, h_j, cols=cols)
            h_j.copy_(d_j)
            del d_j
        add_weight_grads(w1, b1, h2, x2)
        dx = (h2 @ w1).view(x.shape) if ctx.needs_input_grad[0] else None
        del h, h2
        return dx, None, None


def _block_count(hidden: int, out: int) -> int:
    """How many blocks H (`hidden` wide) is worked through in: about hidden / out (an MLP's ratio, 4) when
    the engine splits its recomputation (to save memory), else 1 (fastest)."""
    return max(1, min(hidden, round(hidden / max(1, out)))) if split_inside() else 1


class MlpBranch(PreNormCoupling, nn.Module):
    """G: LayerNorm -> Linear(D, rD) -> GELU -> Linear(rD, D), (B, N, D) -> (B, N, D). No residual: the
    reversible stream (or the stage transition) adds it. Keys `norm`, `mlp.fc1`, `mlp.fc2` follow the
    official `G` sub-block. Per token: the reversible engine may recompute it over slices of the tokens.
    In the reversible engine its coupling is fused: a block of hidden columns at a time (`PreNormCoupling`)."""

    token_wise = True

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def body(self) -> Mlp:
        return self.mlp
