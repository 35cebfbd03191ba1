"""The classification end shared by every revvit model: mean over tokens -> dropout -> Linear."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .stream_norm import mean_tokens


class TokenClassifierMixin:
    """timm's head interface for a model with `num_features`, `num_classes`, `global_pool`, `head_drop`
    and `head` (a Linear, or Identity for no classes). `forward_head`: (B, N, num_features) -> logits."""

    num_features: int
    num_classes: int
    global_pool: str
    head_drop: nn.Module
    head: nn.Module

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, num_features) -> logits (B, classes), or the pooled (B, num_features) with `pre_logits`."""
        if self.global_pool == "avg":
            x = mean_tokens(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)
