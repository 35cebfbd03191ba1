"""The training loop behind `revvit detect train`, and the evaluation behind `revvit detect eval`.

    train_detector(cfg, out)   AdamW, linear warmup then step decay (per iteration), optional autocast
                               (bf16, or fp16 with a grad scaler), an atomic checkpoint after every epoch
                               (exact resume: model, optimizer, scaler, position, history and every random
                               generator; each epoch's order is a function of (seed, epoch)), metrics.json /
                               metrics.csv / curves.png, OUT/config.yaml and OUT/model.safetensors (the
                               detector's options as metadata), COCO AP at the end (and every `eval_every`)
    evaluate_detector(...)     COCO bbox and segm AP of a detector on a dataset

Under `torchrun` (WORLD_SIZE > 1) it runs DistributedDataParallel, each process on its shard of every batch
(the global batch is split) and of the evaluation; rank 0 writes the files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..io import CheckpointError, atomic_write
from ..train.checkpoint import check_output_dir, rng_state, set_rng_state
from .coco import CocoDetection, detection_collate
from .config import DetectionConfig, DetectionConfigError
from .digits_coco import make_digits_coco
from .evaluate import CocoEvalResult, coco_evaluate
from .model import create_detector, detector_options, save_detector
from .transforms import detection_train_transform

__all__ = ["train_detector", "evaluate_detector", "learning_rate"]

_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def learning_rate(cfg: DetectionConfig, it: int, total: int) -> float:
    """Linear warmup from lr * warmup_factor over warmup_iters, then x lr_decay at each of lr_steps."""
    steps = [s * total if s <= 1 else s for s in cfg.lr_steps]
    lr = cfg.lr * cfg.lr_decay ** sum(it >= s for s in steps)
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(cfg: DetectionConfig, rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _datasets(cfg: DetectionConfig, digits_root: Path, rank: int) -> tuple[CocoDetection, CocoDetection]:
    root = cfg.data
    if root is None:  # the embedded default: built once (by rank 0) at digits_root
        root = digits_root
        if rank == 0:
            try:
                make_digits_coco(root, **cfg.digits)
            except TypeError as e:  # an unknown digits.NAME key
                raise DetectionConfigError(f"digits: {e}") from None
            except ValueError as e:
                if type(e) is not ValueError:  # DetectionDataError: says itself what is wrong
                    raise
                raise DetectionConfigError(f"digits: {e}") from None
        if dist.is_initialized():
            dist.barrier()
    train_tf = detection_train_transform(hflip=cfg.hflip, lsj_size=cfg.lsj_size, lsj_scale=tuple(cfg.lsj_scale))
    return CocoDetection(root, "train", train_tf), CocoDetection(root, "val")


def _to(images, targets, device):
    return ([im.to(device, non_blocking=True) for im in images],
            [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets])


@torch.no_grad()
def evaluate_detector(det: nn.Module, dataset: CocoDetection, batch_size: int = 8, device: str | torch.device = "cpu",
                      amp: Optional[str] = None, workers: int = 0) -> CocoEvalResult:
    """COCO bbox and segm AP (pycocotools) of `det` on `dataset` (its annotation file is the ground truth).
    Under torch.distributed each process predicts a shard; rank 0's result holds all of them."""
    det.eval()
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = Subset(dataset, range(rank, len(dataset), world))
    predictions = {}
    for images, targets in DataLoader(shard, batch_size, collate_fn=detection_collate, num_workers=workers):
        images, _ = _to(images, [], device)
        with torch.autocast(device.type, dtype=AMP.get(amp), enabled=amp is not None):
            outputs = det(images)
        for t, o in zip(targets, outputs):
            predictions[int(t["image_id"])] = {k: v.float().cpu() for k, v in o.items()}
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, predictions)
        predictions = {k: v for s in shards for k, v in s.items()}
    return coco_evaluate(predictions, dataset.coco, categories=dataset.categories)


# -- checkpoints and records ---------------------------------------------------------------------------

def _checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in (out / "checkpoints").glob("ckpt_*.pt") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _load_latest(out: Path, log: Callable[[str], None]) -> Optional[dict]:
    """The newest checkpoint that loads (weights_only: a file holding pickled code is refused, never run);
    None when there is none; CheckpointError when there are some but none loads."""
    found = _checkpoints(out)
    for path in found:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (a damaged file: named and skipped, the next one is tried)
            log(f"skipping unreadable checkpoint {path} ({type(e).__name__})")
    if found:
        raise CheckpointError(out / "checkpoints", f"none of its {len(found)} checkpoint(s) loads (damaged, or "
                              "written by an older revvit)", "Start a new run in another --output.")
    return None


# the settings a resumed run cannot change: its data, its batch, its detector
RESUME_FIXED = ("data", "digits", "batch_size", "backbone", "backbone_kwargs", "out_channels", "anchor_sizes",
                "box_head_dim", "mask_head_dim", "detector_kwargs", "min_size", "max_size")


def _same_data(a, b) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def check_resume(saved: dict, cfg: DetectionConfig, out: Path) -> None:
    """DetectionConfigError when `cfg` changes a setting of the run's `saved` config that cannot change."""
    changed = [k for k in RESUME_FIXED if k in saved and
               not (_same_data(saved[k], cfg.data) if k == "data" else saved[k] == getattr(cfg, k))]
    if changed:
        detail = "; ".join(f"{k}: the run has {saved[k]!r}, asked {getattr(cfg, k)!r}" for k in changed)
        raise DetectionConfigError(f"cannot resume {out} with other data, batch or detector ({detail}): resume with "
                                   "the run's own settings (give only what changes, e.g. --epochs), or start a new "
                                   "run in another --output")


def _save_checkpoint(state: dict, out: Path, step: int, keep: int) -> None:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"ckpt_{step}.pt", lambda f: torch.save(state, f))
    for old in _checkpoints(out)[max(keep, 1):]:
        old.unlink(missing_ok=True)


def _write_records(out: Path, history: list[dict]) -> None:
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(history, indent=1).encode()))
    keys = list(dict.fromkeys(k for r in history for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "metrics.csv", lambda f: f.write(buf.getvalue().encode()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot([r["epoch"] for r in history], [r["loss"] for r in history])
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss (sum of Mask R-CNN losses)")
    evals = [r for r in history if "bbox_AP" in r]
    for key in ("bbox_AP", "segm_AP"):
        ax_ap.plot([r["epoch"] for r in evals], [r[key] for r in evals], marker="o", label=key)
    ax_ap.set(xlabel="epoch", ylabel="AP (%)", title="COCO AP@[.5:.95] (val)")
    ax_ap.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "curves.png", lambda f: f.write(png.getvalue()))


# -- the loop ------------------------------------------------------------------------------------------

def train_detector(cfg: DetectionConfig, out: str | os.PathLike, resume: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Train a Mask R-CNN as `cfg` says, writing everything under `out`; returns the last history row (with
    bbox_AP and segm_AP). Raises DetectionDataError / DetectionConfigError / CheckpointError / TrainError (an
    unusable `out`) for what a user can fix; `out` is created only once data, backbone and resume check out."""
    cfg = cfg.check()
    out = Path(out)
    rank, world = _dist()
    main = rank == 0
    say = log if main else (lambda _msg: None)
    if cfg.batch_size % world:
        raise DetectionConfigError(f"batch_size {cfg.batch_size} is the global batch: it must divide by the {world} "
                                   "processes")
    check_output_dir(out)  # nothing is created until data, backbone and resume are known to be good
    ckpt = None
    if _checkpoints(out):
        if not resume:
            raise DetectionConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                                       "or choose another --output")
        ckpt = _load_latest(out, say)
        check_resume(ckpt.get("config", {}), cfg, out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg, rank)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # the embedded digits set lives under OUT; a new OUT is created only after the set built, so it is first
    # built in a temporary folder (one process only: under torchrun OUT is created first)
    staged = None
    digits_root = out / "digits_coco"
    if cfg.data is None and not out.exists() and world == 1:
        staged = Path(tempfile.mkdtemp(prefix="revvit-digits-"))
        digits_root = staged / "digits_coco"
    elif world > 1:
        out.mkdir(parents=True, exist_ok=True)
    try:
        train_ds, val_ds = _datasets(cfg, digits_root, rank)
        if len(train_ds) < cfg.batch_size:
            raise DetectionConfigError(f"the train set has {len(train_ds)} images, fewer than batch_size "
                                       f"{cfg.batch_size}: lower batch_size (--batch-size) or use more images")
        try:
            det = create_detector(cfg.backbone, train_ds.categories.num_classes, min_size=tuple(cfg.min_size),
                                  max_size=cfg.max_size, pretrained=cfg.pretrained, out_channels=cfg.out_channels,
                                  anchor_sizes=cfg.anchor_sizes, box_head_dim=cfg.box_head_dim,
                                  mask_head_dim=cfg.mask_head_dim, backprop=cfg.backprop,
                                  detector_kwargs=cfg.detector_kwargs, **cfg.backbone_kwargs).to(device)
        except TypeError as e:  # an option the backbone or detector does not take
            raise DetectionConfigError(f"backbone {cfg.backbone!r}: {e}") from None
        out.mkdir(parents=True, exist_ok=True)
        if staged is not None:
            shutil.move(str(digits_root), str(out / "digits_coco"))
            train_ds, val_ds = _datasets(cfg, out / "digits_coco", rank)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    params = [p for p in det.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases, norms, position embeddings' 1-D kin: no decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    model = nn.parallel.DistributedDataParallel(det) if world > 1 else det
    per_rank = cfg.batch_size // world
    iters_per_epoch = max(len(train_ds) // cfg.batch_size, 1)
    total = cfg.max_iters or cfg.epochs * iters_per_epoch
    epochs = -(-total // iters_per_epoch)

    history: list[dict] = []
    start_epoch, step = 0, 0
    if resume:
        if ckpt is None:
            say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from the beginning")
        else:
            if ckpt["detector"] != detector_options(det):
                raise CheckpointError(out, "the checkpoint was written for another detector than this config builds",
                                      "Resume with the config the run was started with.")
            det.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
            set_rng_state(ckpt["rng"])
            say(f"resumed at epoch {start_epoch} (iteration {step})")
    if main:
        atomic_write(out / "config.yaml", lambda f: f.write(yaml.safe_dump(dataclasses.asdict(cfg)).encode()))
    say(f"detect train: {cfg.backbone} Mask R-CNN, {len(train_ds)} train / {len(val_ds)} val images, "
        f"{train_ds.categories.num_classes - 1} classes, {total} iterations of batch {cfg.batch_size}, "
        f"{'backprop ' + det.backbone.body.backprop if hasattr(det.backbone.body, 'backprop') else ''}, {device}")

    row: dict = history[-1] if history else {}
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        order = order[: iters_per_epoch * cfg.batch_size].view(-1, cfg.batch_size)  # one row per global batch
        order = order[:, rank * per_rank:(rank + 1) * per_rank]  # this process's part of each
        loader = DataLoader(Subset(train_ds, order.flatten().tolist()), per_rank, collate_fn=detection_collate,
                            num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        model.train()
        sums: dict[str, float] = {}
        count = 0
        for images, targets in loader:
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, total)
            images, targets = _to(images, targets, device)
            with torch.autocast(device.type, dtype=AMP.get(cfg.amp), enabled=cfg.amp is not None):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {step}: lower lr or use bf16 amp")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step, count = step + 1, count + 1
            for k, v in losses.items():  # .item() syncs with the device once per loss term and step
                sums[k] = sums.get(k, 0.0) + v.item()
        row = {"epoch": epoch + 1, "step": step, "lr": learning_rate(cfg, max(step - 1, 0), total),
               "loss": sum(sums.values()) / max(count, 1), **{k: v / max(count, 1) for k, v in sums.items()},
               "time_s": round(time.perf_counter() - t0, 2)}
        last = epoch + 1 == epochs or step >= total
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            result = evaluate_detector(det, val_ds, per_rank, device, cfg.amp, cfg.workers)
            row.update(bbox_AP=float(result.metrics["bbox"]["AP"]), segm_AP=float(result.metrics["segm"]["AP"]))
            if last:
                say(result.summary.rstrip())
        history.append(row)
        say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if main:
            state = {"model": det.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "step": step, "history": history, "rng": rng_state(),
                     "detector": detector_options(det), "config": dataclasses.asdict(cfg)}
            _save_checkpoint(state, out, step, cfg.keep_checkpoints)
            _write_records(out, history)
        if last:
            break
    if main:
        save_detector(det, out / "model.safetensors", {"config": dataclasses.asdict(cfg),
                                                       "class_names": list(train_ds.categories.names)})
        if "bbox_AP" in row:
            say(f"bbox AP {row['bbox_AP']:.2f}  segm AP {row['segm_AP']:.2f}")
    return row
