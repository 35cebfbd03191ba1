"""Evaluation: `evaluate(model, loader, device)` during training, `evaluate_checkpoint(path, data)` for a
saved model (a training checkpoint, the final model.safetensors, or an official .pyth)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import accuracy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import build_datasets
from . import checkpoint as ckpt
from .config import TrainConfig, from_dict
from .distributed import DistInfo, ShardSampler, all_reduce_sum, init_distributed, shutdown
from .parts import AMP_DTYPES, TrainError, check_data_kind, data_spec

__all__ = ["evaluate", "eval_loader", "evaluate_checkpoint"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: Optional[str] = None, lockstep: bool = False) -> dict:
    """Top-1/top-5 (%) and mean cross-entropy over the loader, summed over all ranks. A batch of
    (B, V, C, T, H, W) video views is scored by the mean softmax over its V views.

    `lockstep` (an FSDP-sharded model, whose forward is a collective): every rank runs as many forwards
    as the rank with the most batches; a rank out of batches repeats its first one, uncounted."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    num_classes = None
    batches = _in_lockstep(loader, device) if lockstep else ((x, y, True) for x, y in loader)
    for x, y, counted in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        views = 1
        if x.dim() == 6:
            views = x.shape[1]
            x = x.flatten(0, 1)
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp is not None):
            logits = model(x)
        if not counted:
            continue
        probs = logits.float().softmax(-1)
        probs = probs.view(-1, views, probs.shape[-1]).mean(1)
        num_classes = probs.shape[-1]
        # timm gives this batch's percentages (top-5 is top-C below 5 classes); counts are summed over ranks
        top1, top5 = accuracy(probs, y, topk=(1, 5))
        correct1 += round(top1.item() * y.numel() / 100)  # .item(): a host sync per batch, as the loss's
        correct5 += round(top5.item() * y.numel() / 100)
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()
        count += y.numel()
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], device)
    model.train(was_training)
    count = max(count, 1)
    out = {"top1": 100 * correct1 / count, "loss": loss_sum / count, "count": int(count)}
    if num_classes is not None and num_classes >= 5:
        out["top5"] = 100 * correct5 / count
    return out


def _in_lockstep(loader, device: torch.device) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """(x, y, counted) for every batch of `loader`, then the first batch again (not counted) until this rank
    has run as many as the busiest rank. Every rank learns the fewest and the most batches first, so a
    rank without any batch stops them all together (before any forward waits on it)."""
    counts = torch.tensor([len(loader), -len(loader)], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if fewest == 0 and most > 0:
        raise TrainError("a process has no validation batch while another has: with parallel=fsdp every process "
                         "needs at least one (more validation samples than processes)")
    first = None
    for x, y in loader:
        first = (x, y) if first is None else first
        yield x, y, True
    for _ in range(most - len(loader)):
        yield first[0], first[1], False


def eval_loader(dataset, batch_size: int, num_workers: int, d: DistInfo) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), d.rank, d.world_size),
                      num_workers=num_workers, pin_memory=d.device.type == "cuda")


def class_name_differences(stored: list, data: list) -> Optional[str]:
    """None when the names match label for label; else what differs, in words."""
    stored, data = [str(n) for n in stored], [str(n) for n in data]
    if stored == data:
        return None
    parts = []
    only_stored, only_data = [n for n in stored if n not in data], [n for n in data if n not in stored]
    if only_stored:
        parts.append(f"only in the weights: {only_stored[:10]}" + (" ..." if len(only_stored) > 10 else ""))
    if only_data:
        parts.append(f"only in the data: {only_data[:10]}" + (" ..." if len(only_data) > 10 else ""))
    moved = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(stored, data)) if a != b]
    if moved and not (only_stored or only_data):
        parts.append(f"same names, other labels ({', '.join(moved[:5])}" + (" ..." if len(moved) > 5 else "") + ")")
    return "; ".join(parts)


def evaluate_checkpoint(path: str | Path, data: str, batch_size: int = 64, num_workers: int = 2,
                        device: str = "auto", amp: Optional[str] = None, ignore_class_names: bool = False,
                        log=print) -> dict:
    """Load a revvit checkpoint/.safetensors and evaluate it on the val split of `data`. The class names
    stored with the weights (`revvit train` stores them) must be the data's, label for label, unless
    `ignore_class_names` (then the difference is only reported)."""
    model, info = ckpt.load_model(path)
    saved = dict(info.get("config") or {})
    kw = info.get("model_kwargs", {})
    cfg = from_dict({k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    cfg.img_size = kw.get("img_size", cfg.img_size)
    cfg.in_chans = kw.get("in_chans", cfg.in_chans)
    if "num_frames" in kw:
        cfg.num_frames = kw["num_frames"]
    d = init_distributed(device)
    try:
        bundle = build_datasets(data_spec(cfg, data, info.get("model")), splits=("val",))  # train is not scanned
        check_data_kind(kw, bundle.kind, path, data)
        stored = info.get("class_names")
        diff = class_name_differences(stored, bundle.class_names) if stored else None
        if diff and not ignore_class_names:
            raise TrainError(f"the class names stored with {path} differ from those of {data}: {diff}. The labels "
                             "would not mean the same classes; pass --ignore-class-names to evaluate anyway")
        if diff:
            log(f"warning: class names differ ({diff}); evaluating anyway (--ignore-class-names)")
        classes = kw.get("num_classes")
        if classes is not None and classes != bundle.num_classes:
            raise TrainError(f"{path} predicts {classes} classes but {data} has {bundle.num_classes}")
        model.to(d.device)
        metrics = evaluate(model, eval_loader(bundle.val, batch_size, num_workers, d), d.device, amp)
        metrics["model"] = info.get("model")
        return metrics
    finally:
        shutdown()
