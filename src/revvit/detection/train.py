"""The training loop behind `revvit detect train`, and the evaluation behind `revvit detect eval`.

    train_detector(cfg, out)   AdamW, linear warmup then step decay (per iteration), optional autocast
                               (bf16, or fp16 with a grad scaler), an atomic checkpoint after every epoch
                               (exact resume: model, optimizer, scaler, position, history and every random
                               generator; each epoch's order is a function of (seed, epoch)), metrics.json /
                               metrics.csv / curves.png, OUT/config.yaml and OUT/model.safetensors (the
                               detector's options as metadata), COCO AP at the end (and every `eval_every`);
                               a start that fails before the first checkpoint removes what it created
    run_config(out)            the config a run's newest checkpoint stored: what `--resume` starts from
    evaluate_detector(...)     COCO bbox and segm AP of a detector on a dataset
    evaluate_checkpoint(...)   the same for a detector file on a COCO layout's val split (`revvit detect eval`)

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
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data.common import SkippedFiles
from ..io import CheckpointError, atomic_write, folder_before, remove_created
from ..train.checkpoint import check_output_dir, rng_state, set_rng_state
from .coco import CocoDetection, DetectionDataError, detection_collate
from .config import DetectionConfig, DetectionConfigError, saved_detection_config
from .digits_coco import make_digits_coco
from .evaluate import CocoEvalResult, coco_evaluate
from .model import check_detector_kwargs, create_detector, detector_from_checkpoint, detector_options, save_detector
from .transforms import detection_train_transform

__all__ = ["train_detector", "run_config", "evaluate_detector", "evaluate_checkpoint", "learning_rate"]

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


def _datasets(cfg: DetectionConfig, digits_root: Path, rank: int) -> tuple[CocoDetection, CocoDetection]:
    root = cfg.data
    if root is None:  # the embedded default: built once (by rank 0) at digits_root
        root = digits_root
        if rank == 0:
            try:
                make_digits_coco(root, **cfg.digits)  # its keys and their types: checked by cfg.check()
            except ValueError as e:
                if type(e) is not ValueError:  # DetectionDataError: says itself what is wrong
                    raise
                raise DetectionConfigError(f"digits: {e}") from None
        if dist.is_initialized():
            dist.barrier()
    train_tf = detection_train_transform(hflip=cfg.hflip, lsj_size=cfg.lsj_size, lsj_scale=tuple(cfg.lsj_scale))
    with warnings.catch_warnings():  # unreadable files: said by the caller as one line
        warnings.simplefilter("ignore", SkippedFiles)
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


def evaluate_checkpoint(path: str | os.PathLike, data: str | os.PathLike, batch_size: int = 8, device: str = "auto",
                        amp: Optional[str] = None, log: Callable[[str], None] = print) -> CocoEvalResult:
    """`revvit detect eval`: COCO AP of the detector in `path` (model.safetensors or a checkpoint .pt of `revvit
    detect train`) on the val split of `data`; DetectionDataError when the data has other categories or no
    objects to measure AP on. Unreadable images are dropped and said by `log` in one line."""
    det, meta = detector_from_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFiles)  # said below, as one line
        dataset = CocoDetection(data, "val")
    _say_skipped(dataset, log)
    if not dataset.num_objects:
        raise DetectionDataError(f"{dataset.ann_file} has no (non-crowd) annotations: there is nothing to evaluate; "
                                 "give a val set with annotated objects")
    trained = meta.get("detector", {}).get("num_classes")
    if trained != dataset.categories.num_classes:
        raise DetectionDataError(f"{path} detects {trained - 1 if trained else '?'} classes but {data} has "
                                 f"{dataset.categories.num_classes - 1}: evaluate on its own categories")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_detector(det.to(device), dataset, batch_size, device, amp)


def _say_skipped(dataset: CocoDetection, say: Callable[[str], None]) -> None:
    if dataset.skipped:
        say(f"skipped {len(dataset.skipped)} unreadable file(s) in {dataset.image_dir}: "
            f"{', '.join(dataset.skipped[:5])}" + (" ..." if len(dataset.skipped) > 5 else ""))


# -- checkpoints and records ---------------------------------------------------------------------------

def _checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in (out / "checkpoints").glob("ckpt_*.pt") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _load_latest(out: Path, log: Callable[[str], None], mmap: bool = False) -> Optional[dict]:
    """The newest checkpoint that loads (weights_only: a file holding pickled code is refused, never run;
    `mmap`: tensors mapped, not read); None when there is none; CheckpointError when none of them loads."""
    found = _checkpoints(out)
    for path in found:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def check_resume(saved: dict, cfg: DetectionConfig, out: Path) -> list[str]:
    """The settings `cfg` changes from the run's `saved` config; DetectionConfigError for one that cannot
    change in a run in progress (its data, batch or detector)."""
    changed = [k for k in RESUME_FIXED if k in saved and
               not (_same_data(saved[k], cfg.data) if k == "data" else saved[k] == getattr(cfg, k))]
    if changed:
        detail = "; ".join(f"{k}: the run has {saved[k]!r}, asked {getattr(cfg, k)!r}" for k in changed)
        raise DetectionConfigError(f"cannot resume {out} with other data, batch or detector ({detail}): resume with "
                                   "the run's own settings (give only what changes, e.g. --epochs), or start a new "
                                   "run in another --output")
    return [k for k, v in saved.items() if k not in RESUME_FIXED and hasattr(cfg, k) and v != getattr(cfg, k)]


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

def run_config(out: str | os.PathLike) -> Optional[DetectionConfig]:
    """The config of the run in `out` as its newest readable checkpoint stored it (what `--resume` starts from);
    None when `out` holds no checkpoint. The tensors are memory-mapped, not read."""
    ckpt = _load_latest(Path(out), lambda _msg: None, mmap=True)
    return None if ckpt is None else saved_detection_config(ckpt.get("config", {}))


def train_detector(cfg: DetectionConfig, out: str | os.PathLike, resume: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Train a Mask R-CNN as `cfg` says, writing everything under `out`; returns the last history row (with
    bbox_AP and segm_AP when the val set has objects). Raises DetectionDataError / DetectionConfigError /
    CheckpointError / TrainError (an unusable `out`) for what a user can fix. Settings, device and `out` are
    checked before anything is created; `out` is created only once data, detector and resume check out, and a
    start that fails before the first checkpoint removes what it created."""
    cfg = cfg.check()
    check_detector_kwargs(cfg.detector_kwargs)
    out = Path(out)
    rank, world = _dist()
    say = log if rank == 0 else (lambda _msg: None)
    if cfg.batch_size % world:
        raise DetectionConfigError(f"batch_size {cfg.batch_size} is the global batch: it must divide by the {world} "
                                   "processes")
    device = _device(cfg, rank)
    check_output_dir(out)
    ckpt = _start_point(cfg, out, resume, say)
    before = folder_before(out)  # a failed start removes what it created, nothing that was there
    try:
        return _train(cfg, out, ckpt, device, rank, world, say)
    except BaseException:
        if rank == 0 and not _checkpoints(out):
            remove_created(out, before)
        raise


def _device(cfg: DetectionConfig, rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DetectionConfigError(f"device={cfg.device}, but this machine has no usable CUDA GPU "
                                   "(torch.cuda.is_available() is False): use device=cpu or device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise DetectionConfigError(f"device={cfg.device}, but this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return device


def _start_point(cfg: DetectionConfig, out: Path, resume: bool, say: Callable[[str], None]) -> Optional[dict]:
    """The checkpoint to resume from (None: a new run), after refusing an `out` whose results a new run would
    overwrite and a resume that changes the run's data, batch or detector."""
    if not _checkpoints(out):
        if (out / "model.safetensors").exists():
            raise DetectionConfigError(f"{out} holds the model.safetensors of a finished run and no checkpoint to "
                                       "continue from: choose another --output, or move that file away first")
        if resume:
            say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from the beginning")
        return None
    if not resume:
        raise DetectionConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                                   "or choose another --output")
    ckpt = _load_latest(out, say)
    saved = ckpt.get("config", {})
    changed = check_resume(saved, cfg, out)
    if changed:
        say(f"resuming {out} with {', '.join(f'{k} {saved[k]!r} -> {getattr(cfg, k)!r}' for k in changed)}")
    return ckpt


def _build(cfg: DetectionConfig, out: Path, ckpt: Optional[dict], device: torch.device, rank: int, world: int,
           say: Callable[[str], None]) -> tuple[CocoDetection, CocoDetection, nn.Module]:
    """(train set, val set, detector on `device`); `out` exists afterwards, not before data and detector do."""
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
        try:  # a resumed run has its own weights: the pretrained file is not read again
            det = create_detector(cfg.backbone, train_ds.categories.num_classes, min_size=tuple(cfg.min_size),
                                  max_size=cfg.max_size, pretrained=None if ckpt else cfg.pretrained,
                                  out_channels=cfg.out_channels, anchor_sizes=cfg.anchor_sizes,
                                  box_head_dim=cfg.box_head_dim, mask_head_dim=cfg.mask_head_dim,
                                  backprop=cfg.backprop, detector_kwargs=cfg.detector_kwargs,
                                  **cfg.backbone_kwargs).to(device)
        except TypeError as e:  # an option the backbone or detector does not take
            raise DetectionConfigError(f"backbone {cfg.backbone!r}: {e}") from None
        out.mkdir(parents=True, exist_ok=True)
        if staged is not None:
            shutil.move(str(digits_root), str(out / "digits_coco"))
            train_ds, val_ds = _datasets(cfg, out / "digits_coco", rank)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    for ds in (train_ds, val_ds):  # said here, as one line each (the data layer's warnings are filtered)
        _say_skipped(ds, say)
    if not val_ds.num_objects:
        say(f"warning: {val_ds.ann_file} has no (non-crowd) annotations: there is nothing to measure AP on, so "
            "the run is not evaluated")
    return train_ds, val_ds, det


def _train(cfg: DetectionConfig, out: Path, ckpt: Optional[dict], device: torch.device, rank: int, world: int,
           say: Callable[[str], None]) -> dict:
    main = rank == 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_ds, val_ds, det = _build(cfg, out, ckpt, device, rank, world, say)
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
    if ckpt is not None:
        if ckpt["detector"] != detector_options(det):
            raise CheckpointError(out, "the checkpoint was written for another detector than this config builds",
                                  "Resume with the config the run was started with.")
        det.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        set_rng_state(ckpt["rng"])
        if step >= total and (out / "model.safetensors").is_file():  # nothing to do: nothing is rewritten
            say(f"{out} already did {step} iterations, the {total} asked: nothing to train (a larger --epochs or "
                "max_iters extends the run)")
            return history[-1] if history else {}
        say(f"resumed at epoch {start_epoch} (iteration {step})")
    if main:
        atomic_write(out / "config.yaml", lambda f: f.write(yaml.safe_dump(dataclasses.asdict(cfg)).encode()))
    say(f"detect train: {cfg.backbone} Mask R-CNN, {len(train_ds)} train / {len(val_ds)} val images, "
        f"{train_ds.categories.num_classes - 1} classes, {total} iterations of batch {cfg.batch_size}, "
        f"{'backprop ' + det.backbone.body.backprop if hasattr(det.backbone.body, 'backprop') else ''}, {device}")

    row: dict = history[-1] if history else {}
    for epoch in range(start_epoch, epochs):
        if step >= total:  # a resumed run already as long as asked
            break
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
        if val_ds.num_objects and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
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
