"""Two-layer perceptron, and the G branch of the reversible blocks (LayerNorm -> MLP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reversible.hooks import has_hooks
from ..reversible.pieces import even_slices, split_inside
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

    def _plain_gelu_mlp(self) -> bool:
        """Linear -> GELU -> Linear and nothing else (no subclass with its own forward, no dropout, no hooks):
        what the fused paths compute, bypassing the modules' calls."""
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
            raise RuntimeError("the reversible engine's fused MLP was back-propagated twice (retain_graph); "
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


class MlpBranch(nn.Module):
    """G: LayerNorm -> Linear(D, rD) -> GELU -> Linear(rD, D), (B, N, D) -> (B, N, D). No residual: the
    reversible stream (or the stage transition) adds it. Keys `norm`, `mlp.fc1`, `mlp.fc2` follow the
    official `G` sub-block. Per token: the reversible engine may recompute it over slices of the tokens."""

    token_wise = True

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm(x))
