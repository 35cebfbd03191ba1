"""Two-layer perceptron, and the G branch of the reversible blocks (LayerNorm -> MLP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import has_hooks
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
    only. Its backward holds two hidden-sized tensors at a time, where autograd's holds three (H, GELU(H)
    and dA), and adds the weight gradients into `.grad` in place (see `layers.linear`):

        dA = dY W2
        dH = GELU'(H) * dA                       written over dA
        A = GELU(H)                              written over H (not needed any more)
        dW2 += dY^T A,  db2 += sum dY            then A is freed
        dW1 += dH^T X,  db1 += sum dH
        dX = dH W1

    H belongs to this Function alone (made in its forward), so it is kept on `ctx` rather than saved:
    the backward can then free it before dX is made. One backward per forward (the engine's case).
    """

    @staticmethod
    def forward(ctx, x: Tensor, params: tuple, approximate: str) -> Tensor:
        w1, b1, w2, b2 = params
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x)
        ctx.hidden, ctx.params, ctx.approximate = h, params, approximate
        return F.linear(F.gelu(h, approximate=approximate), w2, b2)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,), h = ctx.saved_tensors, ctx.hidden
        if h is None:
            raise RuntimeError("the reversible engine's fused MLP was back-propagated twice (retain_graph); "
                               "its hidden layer is used up by the first backward")
        ctx.hidden = None
        w1, b1, w2, b2 = ctx.params
        dy = dy.contiguous()
        dh = dy @ w2
        dh = torch.ops.aten.gelu_backward.grad_input(dh, h, approximate=ctx.approximate, grad_input=dh)
        a = torch.ops.aten.gelu_(h, approximate=ctx.approximate)
        del h
        add_weight_grads(w2, b2, dy, a)
        del a
        add_weight_grads(w1, b1, dh, x)
        return (dh @ w1 if ctx.needs_input_grad[0] else None), None, None


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
