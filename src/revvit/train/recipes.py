"""The recipes a run starts from when no `--config` is given, the run's header, and resuming a run's config.

No `--config` (see `config.load_config`):
- data "digits" / "digits-video": the demos (`config.DEFAULT_CONFIG`, `config.DIGITS_VIDEO_CONFIG`).
- an image folder or video lists: `GENERAL_CONFIG` for the chosen model (default rev_vit_tiny_patch16_224) with
  the model's own architecture (no demo model_kwargs), its input size (timm's pretrained_cfg: 224) and
  normalisation, the channels of the data (images: grey only if every sampled image is grey; videos: RGB),
  threads and DataLoader workers from the machine (`machine_threads`).
- `--pretrained FILE` (any data): `FINETUNE_CONFIG` (= configs/finetune.yaml) with the file's architecture.

Resume (`resume_config`): the run's config is its newest checkpoint's; only the settings given again change.
Architecture (model, model_kwargs), data and input (data, img_size, in_chans, num_frames) and batch_size
cannot change in a run; schedule settings (epochs, lr, ...) can: the schedule is then rebuilt at the step
reached (`SCHEDULE_KEYS`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..data.video import find_video_lists, lists_images
from . import checkpoint as ckpt
from .config import TrainConfig, apply_overrides, from_dict, read_config_file, valid_keys

__all__ = ["GENERAL_CONFIG", "FINETUNE_CONFIG", "general_config", "with_pretrained", "machine_threads",
           "detect_in_chans", "describe_run", "train_config", "resume_config", "check_resume", "FIXED_KEYS",
           "SCHEDULE_KEYS"]

# Training from scratch on your own data, a short run: light augmentation (random resized crop, flip,
# colour jitter 0.4: no RandAugment, mixup or cutmix, which a few epochs on a small set cannot absorb),
# AdamW 2e-3 at batch 64 (lr 0.016 per 512) after one warmup epoch, cosine to 1e-5.
GENERAL_CONFIG: dict[str, Any] = dict(
    model_kwargs={}, train_aug=True, auto_augment=None, reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
    epochs=30, batch_size=64, lr=0.016, min_lr=1e-5, warmup_epochs=1.0, warmup_lr=1e-6, weight_decay=0.05,
    clip_grad=1.0, drop_path=0.1, memory_table=False,
)

# Fine-tuning released weights on your own classes (the BEiT/MAE practice, shortened): layer-wise lr decay
# 0.75, AdamW 1.25e-4 at batch 64 (lr 1e-3 per 512) after one warmup epoch, drop path 0.1, RandAugment m7.
# configs/finetune.yaml holds the same settings (a test keeps them equal).
FINETUNE_CONFIG: dict[str, Any] = dict(
    GENERAL_CONFIG, auto_augment="rand-m7-mstd0.5-inc1", reprob=0.25, epochs=10, lr=1e-3, layer_decay=0.75,
)

FIXED_KEYS = ("model", "model_kwargs", "data", "img_size", "in_chans", "num_frames", "batch_size")
SCHEDULE_KEYS = ("epochs", "steps_per_epoch", "lr", "min_lr", "warmup_epochs", "warmup_lr")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def machine_threads() -> tuple[int, int]:
    """(torch intra-op threads, DataLoader workers) for this machine: half the cores load data (at most 8),
    the rest compute."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, cores // 2)
    return max(1, cores - workers), workers


def detect_in_chans(data: Optional[str], sample: int = 32) -> int:
    """1 when every sampled image of the folder's train/ (the first of each of up to `sample` classes) is
    grey, else 3; video lists and anything unreadable: 3 (the data loader then says what is wrong)."""
    if data is None:
        return 3
    root = Path(data).expanduser()
    lists = find_video_lists(root) if root.is_dir() else None
    if lists is not None and not lists_images(lists["train"]):
        return 3
    modes = []
    try:
        classes = sorted(e.path for e in os.scandir(root / "train") if e.is_dir() and not e.name.startswith("."))
        for folder in classes[:sample]:
            first = next((e.path for e in sorted(os.scandir(folder), key=lambda e: e.name)
                          if e.is_file() and Path(e.name).suffix.lower() in IMG_EXTENSIONS), None)
            if first is not None:
                with Image.open(first) as im:
                    modes.append(im.mode)
    except OSError:
        return 3
    return 1 if modes and all(m in _GREY_MODES for m in modes) else 3


def _model_input(model: str, video: bool) -> dict:
    """The model's own input size (and clip length for video), from timm's pretrained cfg / its config."""
    if model not in timm.list_models():
        return {}  # create_run_model names the known models
    if video:
        with torch.device("meta"):
            cfg = getattr(timm.create_model(model), "cfg", None)
        if cfg is not None:
            return {"img_size": int(cfg.img_size), "num_frames": int(getattr(cfg, "num_frames", 16))}
    pc = timm.models.get_pretrained_cfg(model)
    return {"img_size": int(pc.input_size[-1])} if pc is not None and pc.input_size else {}


def general_config(data: Optional[str], model: Optional[str] = None, pretrained: Optional[str] = None
                   ) -> TrainConfig:
    """The recipe for `data` (a folder or video lists) and `model` without --config (module docstring)."""
    threads, workers = machine_threads()
    values = dict(FINETUNE_CONFIG if pretrained else GENERAL_CONFIG, threads=threads, num_workers=workers)
    if data is not None:
        values["data"] = data
    if model is not None:
        values["model"] = model
    cfg = from_dict(values)
    if pretrained:
        cfg.pretrained = pretrained
        return with_pretrained(cfg, pretrained, keep_model=model is not None).validate()
    root = Path(str(data)).expanduser()
    lists = find_video_lists(root) if data not in (None, "digits", "digits-video") and root.is_dir() else None
    video = data == "digits-video" or (lists is not None and not lists_images(lists["train"]))
    for key, value in _model_input(cfg.model, video).items():
        setattr(cfg, key, value)
    cfg.in_chans = detect_in_chans(data) if data not in (None, "digits", "digits-video") else 1
    return cfg.validate()


def with_pretrained(cfg: TrainConfig, path: str, keep_model: bool = False) -> TrainConfig:
    """`cfg` with the architecture (unless `keep_model`) and input geometry of the weights in `path`."""
    from .finetune import apply_pretrained_arch, read_pretrained

    return apply_pretrained_arch(cfg, read_pretrained(path), keep_model=keep_model)


# -- the header of a run ---------------------------------------------------------------------------------
def describe_run(cfg: TrainConfig, data, n_params: int, device: str, world_size: int, out_dir: Path) -> str:
    """What the run runs, in a few lines: model, data, input, optimisation, machine, where the config is."""
    frames = f" x {data.num_frames} frames" if data.kind == "video" else ""
    decay = f", layer decay {cfg.layer_decay}" if cfg.layer_decay else ""
    lines = [
        f"model   {cfg.model} ({n_params / 1e6:.2f}M params), backprop {cfg.backprop}"
        + (f", amp {cfg.amp}" if cfg.amp else ""),
        f"data    {cfg.data} ({data.kind}): {data.num_classes} classes, {data.in_chans} channel(s), "
        f"{len(data.train)} train / {len(data.val)} val",
        f"input   {cfg.img_size}x{cfg.img_size}{frames}; augmentation "
        + (f"{cfg.auto_augment or 'crop/flip/jitter'}, mixup {cfg.mixup}, cutmix {cfg.cutmix}" if cfg.train_aug
           else "off"),
        f"optim   {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, global batch {cfg.batch_size}, "
        f"lr {cfg.effective_lr:.3g} "
        f"(= {cfg.lr:g} x {cfg.batch_size}/512), warmup {cfg.warmup_epochs:g} epoch(s), wd {cfg.weight_decay}{decay}",
        f"machine {device} x {world_size}, {cfg.threads or torch.get_num_threads()} thread(s), "
        f"{cfg.num_workers} worker(s)",
    ]
    if cfg.pretrained:
        lines.append(f"from    {cfg.pretrained}")
    lines.append(f"config  {out_dir / 'config.yaml'}")
    return "\n".join(lines)


# -- the config of a run -----------------------------------------------------------------------------------
def _values(items: list[str]) -> dict:
    return dict(item.split("=", 1) for item in items if "=" in item)


def train_config(config: Optional[str], overrides: list[str], out_dir: Optional[Path] = None, resume: bool = False,
                 log: Callable[[str], None] = print) -> TrainConfig:
    """The config `revvit train` runs: with `resume` and a checkpoint in `out_dir`, the run's own config with
    `overrides` (and the keys a `config` file sets) applied; else `load_config` for the recipe, data, model and
    pretrained file given, with `overrides` (key=value strings, the flags included) applied."""
    from .config import load_config

    given = _values(overrides)
    if resume and out_dir is not None and ckpt.resumable(out_dir):
        return resume_config(out_dir, config, overrides, log)
    if resume and out_dir is not None and config is None and (Path(out_dir) / ckpt.CONFIG).is_file():
        config = str(Path(out_dir) / ckpt.CONFIG)  # stopped before its first checkpoint: start it again as it was
        log(f"no checkpoint in {out_dir}: starting the run again from its {ckpt.CONFIG}")
    cfg = load_config(config, data=given.get("data"), model=given.get("model"), pretrained=given.get("pretrained"))
    return apply_overrides(cfg, [o for o in overrides if not o.startswith("pretrained=")])


def resume_config(out_dir: Path, config: Optional[str], overrides: list[str],
                  log: Callable[[str], None] = print) -> TrainConfig:
    """The newest checkpoint's config with only the given settings changed; refuses a change that cannot
    apply to a run in progress (`check_resume`)."""
    found = ckpt.load_latest(out_dir, log=log)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {out_dir} to resume")
    saved = {k: v for k, v in found[1]["config"].items() if k in valid_keys()}
    cfg = from_dict(saved)
    if config is not None:
        cfg = from_dict(read_config_file(config), cfg)
    cfg = apply_overrides(cfg, overrides)
    changed = check_resume(saved, cfg, out_dir)
    if changed:
        log(f"resuming {out_dir} with {', '.join(f'{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}' for k in changed)}")
    return cfg


def _same_data(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except OSError:
        return False


def check_resume(saved: dict, cfg: TrainConfig, out_dir: Any = "the run") -> list[str]:
    """The settings `cfg` changes from the run's `saved` config; ConfigError for one that cannot apply to a
    run in progress (another architecture, data set or input geometry, another global batch)."""
    from .config import ConfigError

    def differs(key: str) -> bool:
        if key not in saved:
            return False
        if key == "data":
            return not _same_data(saved[key], cfg.data)
        return saved[key] != getattr(cfg, key)

    fixed = [k for k in FIXED_KEYS if differs(k)]
    if fixed:
        what = ("another architecture" if {"model", "model_kwargs"} & set(fixed) else
                "another data set" if "data" in fixed else
                "another global batch" if fixed == ["batch_size"] else "another input size or channel count")
        detail = "; ".join(f"{k}: the run has {saved[k]!r}, asked {getattr(cfg, k)!r}" for k in fixed)
        raise ConfigError(f"cannot resume {out_dir} with {what} ({detail}). Resume with the run's own settings "
                          "(give only what changes, e.g. --epochs), or start a new run in another --output "
                          f"(to start from this run's weights: --pretrained {Path(str(out_dir)) / 'model.safetensors'}"
                          " or one of its .pt checkpoints)")
    return [k for k in valid_keys() if k in saved and k not in FIXED_KEYS and differs(k)]
