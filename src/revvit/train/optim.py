"""AdamW with the recipes' weight-decay exemptions, and the per-step warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_factor"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the exempt ones (biases, 1-D params such as norms, and the
    names in `model.no_weight_decay()`, e.g. position embeddings)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or name in skip
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.effective_lr,
                             betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, start: float, end: float) -> float:
    """Multiplier of the peak lr before optimiser step `step` (0-based): linear from `start` to 1 over
    the warmup, then a half cosine from 1 down to `end`."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """LambdaLR stepped once per optimiser step. Its state (last_epoch = steps taken) is checkpointed."""
    peak = cfg.effective_lr
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    start, end = min(1.0, cfg.warmup_lr / peak), min(1.0, cfg.min_lr / peak)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, start, end))
