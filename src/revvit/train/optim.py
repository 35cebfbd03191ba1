"""AdamW with the recipes' weight-decay exemptions, and the per-step warmup + cosine schedule (timm's)."""
from __future__ import annotations

import logging

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from .config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at `cfg.effective_lr`; no weight decay on biases, 1-D parameters such as norms, and the names in
    `model.no_weight_decay()` (e.g. position embeddings)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=cfg.effective_lr, betas=tuple(cfg.betas), eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """The lr before optimiser step t (0-based): linear from `warmup_lr` to the peak `effective_lr` over the
    warmup steps, then a half cosine down to `min_lr`, reached at the last step. Call
    `step_update(steps taken)` after every optimiser step; its `state_dict()` goes into the checkpoint."""
    peak = cfg.effective_lr
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    # never above the peak: a recipe whose warmup_lr or min_lr exceeds it keeps the peak instead
    quiet = _Without("Cosine annealing scheduler will have no effect")  # a one-step cosine is what a tiny run asks
    logger = logging.getLogger(CosineLRScheduler.__module__)
    logger.addFilter(quiet)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=min(cfg.min_lr, peak),
                                 warmup_t=warmup, warmup_lr_init=min(cfg.warmup_lr, peak), warmup_prefix=True,
                                 t_in_epochs=False)
    finally:
        logger.removeFilter(quiet)


class _Without(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
