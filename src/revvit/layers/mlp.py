"""Two-layer perceptron, and the G branch of the reversible blocks (LayerNorm -> MLP)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import Linear


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
        h = self.fc1(x)
        if self._activate_in_place():  # no graph: the hidden layer is held once, not twice
            h = torch.ops.aten.gelu_(h, approximate=self.act.approximate)
        else:
            h = self.act(h)
        return self.drop(self.fc2(self.drop(h)))

    def _activate_in_place(self) -> bool:
        act = self.act
        return (not torch.is_grad_enabled() and type(act) is nn.GELU
                and not (act._forward_hooks or act._forward_pre_hooks))


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
