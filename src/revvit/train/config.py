"""TrainConfig: every knob of a training run, one dataclass; YAML recipes and `key=value` overrides.

A recipe (configs/*.yaml) sets a subset of the fields; the command line overrides any of them with
`key=value` (the value is parsed as the field's type) or with the flags of `revvit train`. Unknown keys
and ill-typed values are refused with a message naming the valid keys.

Learning-rate rule: `lr` is the learning rate **per 512 images of global batch**; the optimiser uses
`lr * batch_size / 512` (linear scaling), where `batch_size` is the global batch (all processes
together). The official recipes give absolute rates at their own global batch: Rev-ViT-S/B 5e-4 at 512
(lr: 5e-4), Rev-MViT-B 2.5e-4 at 256 (lr: 5e-4), Rev-MViT-B 16x4 1.6e-3 at 256 (lr: 3.2e-3).
`min_lr` and `warmup_lr` are absolute.

Data verification (`verify_data`): true opens every file of both splits before training and drops the
unreadable ones (named in summary.json); false opens none up front; none (the default) does so for a split
of at most 20,000 files and, for a larger one (ImageNet, Kinetics), says so once and relies on the load-time
check, which warns about and substitutes an unreadable file when it is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..data import DataOptions
from ..io import plain_data

__all__ = ["TrainConfig", "ConfigError", "LR_REFERENCE_BATCH", "load_config", "apply_overrides", "DEFAULT_CONFIG",
           "DIGITS_VIDEO_CONFIG", "BUILTIN_DATA", "save_config", "read_config_file"]

BUILTIN_DATA = (None, "digits", "digits-video")

LR_REFERENCE_BATCH = 512


class ConfigError(ValueError):
    """A recipe or command-line setting that cannot be used; the message says which and why."""


@dataclass
class TrainConfig(DataOptions):
    # -- model: timm.create_model(model, num_classes=<data>, img_size=<data>, in_chans=<data>,
    #    drop_path_rate=drop_path, **model_kwargs)
    model: str = "rev_vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    drop_path: float = 0.0
    pretrained: Optional[str] = None  # start from this file's weights: official .pyth, revvit .safetensors or .pt
    layer_decay: Optional[float] = None  # layer-wise lr decay (e.g. 0.75: each block down gets 0.75x the lr)
    backprop: str = "reversible"  # "reversible" (recompute activations), "parallel" (the same, two CUDA streams)
    #                               or "autograd" (store them)
    # -- data: the source here; how it is sampled and transformed (img_size, in_chans, num_frames,
    #    sampling_rate, train_aug, auto_augment, reprob, test_clips, test_crops) from revvit.data.DataOptions
    data: str = "digits"
    num_workers: int = 2
    verify_data: Optional[bool] = None  # open every file up front: true, false, none = if a split has <= 20,000
    # -- optimisation: AdamW, cosine schedule after linear warmup, stepped every optimiser step
    epochs: int = 300
    steps_per_epoch: int = 0  # 0: a full pass over the data; N: stop each epoch after N steps
    batch_size: int = 512  # global: split evenly across processes
    lr: float = 5e-4  # per 512 images; the optimiser uses lr * batch_size / 512
    min_lr: float = 1e-6
    warmup_epochs: float = 70.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05  # not on biases, 1-D parameters, or the model's no_weight_decay() names
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: Optional[float] = None  # max global gradient norm
    mixup: float = 0.8  # mixup alpha (0: off)
    cutmix: float = 1.0  # cutmix alpha (0: off)
    label_smoothing: float = 0.1
    repeated_aug: int = 1  # >1: each sample this many times per epoch, spread over processes
    ema: bool = False
    ema_decay: float = 0.9999
    amp: Optional[str] = None  # None (fp32), "bf16" or "fp16"
    # -- run
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms(True): exact resume
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    parallel: str = "ddp"  # under torchrun: "ddp" (whole model per process) or "fsdp" (FSDP2, sharded)
    ckpt_every_steps: int = 0  # also checkpoint every N optimiser steps (0: at epoch ends only)
    keep_last: int = 2  # checkpoints kept besides best.pt
    eval_every: int = 1  # epochs
    memory_table: bool = False  # end with reversible-vs-autograd activation memory per image
    progress: bool = True  # tqdm bar (rank 0 only)

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name, tp in _field_types().items():  # nan and infinity would slip through the comparisons below
            value = getattr(self, name)
            if float in (tp, *typing.get_args(tp)) and value is not None:
                need(math.isfinite(value), f"{name} must be a finite number, got {value}")
        need(isinstance(self.data, str) and self.data.strip() != "",
             f"data must name a data set (digits, digits-video, or a folder), got {self.data!r}")
        need(self.backprop in ("reversible", "parallel", "autograd"),
             f"backprop must be 'reversible', 'parallel' or 'autograd', got {self.backprop!r}")
        need(self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        need(self.amp in (None, "bf16", "fp16"), f"amp must be bf16, fp16 or none, got {self.amp!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("epochs", "batch_size", "img_size", "in_chans", "num_frames", "keep_last", "eval_every",
                     "repeated_aug"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "ckpt_every_steps", "num_workers", "threads", "warmup_epochs",
                     "weight_decay", "mixup", "cutmix", "min_lr", "warmup_lr", "drop_path"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.eps > 0, f"eps (AdamW's denominator term) must be > 0, got {self.eps}")
        need(0 <= self.seed < 2 ** 32, f"seed must be in [0, 2**32), got {self.seed}")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0 <= self.reprob <= 1, f"reprob must be in [0, 1], got {self.reprob}")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                          and 0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be > 0 or none, got {self.clip_grad}")
        need(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"layer_decay must be in (0, 1] or none, got {self.layer_decay}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def effective_lr(self) -> float:
        return self.lr * self.batch_size / LR_REFERENCE_BATCH


# The embedded default (`revvit train` with no arguments): a small Rev-ViT (the tiny one at 6 blocks of
# width 96, 8x8 patches of the 16x16 upsampled digits) on the digits data: ~96-98% test top-1 in about a
# minute on two CPU cores. configs/digits.yaml holds the same settings (a test keeps them equal).
DEFAULT_CONFIG: dict[str, Any] = dict(
    model="rev_vit_tiny_patch16_224",
    model_kwargs=dict(patch_size=8, embed_dim=96, depth=6, num_heads=3),
    data="digits", img_size=16, in_chans=1,
    train_aug=True, auto_augment=None, reprob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
    epochs=12, batch_size=32, lr=0.032, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05, clip_grad=1.0,
    drop_path=0.0, num_workers=0, threads=1, memory_table=True,
)


# The embedded video default (`revvit train --data digits-video`): the tiny Rev-MViT video model (Conv3d stem,
# avg fusion, fused qkv: the Kinetics layout) on 4-frame 32x32 clips of a moving digit, label = the digit;
# ~95% test top-1 in about 3.5 minutes on one CPU core. configs/digits_video.yaml holds the same settings.
DIGITS_VIDEO_CONFIG: dict[str, Any] = dict(
    DEFAULT_CONFIG, model="rev_mvit_tiny_video", model_kwargs={}, data="digits-video", img_size=32,
    num_frames=4, sampling_rate=2, test_clips=2, epochs=8, lr=0.064,
)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (a YAML value, or a command-line string) to the field type `tp`, or refuse."""
    bad = ConfigError(f"{key}: cannot use {value!r} as {getattr(tp, '__name__', tp)}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, value, inner)
    if isinstance(value, str) and tp in (list, dict):
        value = yaml.safe_load(value) if value.strip() else tp()
        if tp is list and isinstance(value, (int, float)):
            value = [value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise bad from None
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise bad
        return value
    raise bad


def _set(cfg: TrainConfig, key: str, value: Any) -> None:
    types = _field_types()
    if "." in key:  # model_kwargs.depth=6
        top, sub = key.split(".", 1)
        if top != "model_kwargs":
            raise ConfigError(f"only model_kwargs takes sub-keys (model_kwargs.NAME=VALUE), got {key!r}")
        cfg.model_kwargs = {**cfg.model_kwargs, sub: yaml.safe_load(value) if isinstance(value, str) else value}
        return
    if key not in types:
        raise _unknown_key(key)
    value = _coerce(key, value, types[key])
    if key == "model" and value != cfg.model:
        cfg.model_kwargs = {}  # they were options of the previous model
    setattr(cfg, key, value)


def from_dict(values: dict, base: Optional[TrainConfig] = None) -> TrainConfig:
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    cfg.model_kwargs = dict(cfg.model_kwargs)
    # "model" first: choosing another model drops the previous one's model_kwargs, not the ones given here
    for key, value in sorted(values.items(), key=lambda item: str(item[0]) != "model"):
        _set(cfg, str(key), value)
    return cfg


def read_config_file(path: str | Path, merge_base: bool = True) -> dict:
    """The settings a YAML recipe sets, unchecked; with `merge_base`, over those of its `base:` recipes."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give a YAML file (e.g. configs/digits.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8): give a YAML recipe") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    if merge_base and "base" in values:
        values = {**read_config_file(path.parent / values.pop("base")), **values}
    return values


def _load_file(path: Path) -> TrainConfig:
    values = read_config_file(path, merge_base=False)
    base = _load_file(path.parent / values.pop("base")) if "base" in values else None
    try:
        return from_dict(values, base).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(path: Optional[str | Path] = None, data: Optional[str] = None, model: Optional[str] = None,
                pretrained: Optional[str] = None) -> TrainConfig:
    """A YAML recipe (`path`; it may name a `base:` recipe file, relative to itself, whose settings it changes)
    or, without one, the embedded recipe that fits the data:

    - the digits demo (`data` None or "digits"), the digits video demo ("digits-video");
    - for an image folder or video lists, the general recipe for `model` (`recipes.general_config`: the
      model's own architecture, channels from the data, threads and workers from the machine);
    - with `pretrained` (any data), the fine-tuning recipe (`recipes.FINETUNE_CONFIG`, = configs/finetune.yaml).

    With `pretrained` (given, or set by the recipe), the architecture and input geometry are the file's
    unless `model` is given (`finetune.apply_pretrained_arch`). `data`, `model`, `pretrained` are only
    read here to choose; set them on the result (flags, key=value) as any other setting."""
    from . import recipes  # recipes builds on this module

    if path is None and pretrained is None and data in BUILTIN_DATA:
        cfg = from_dict(DIGITS_VIDEO_CONFIG if data == "digits-video" else DEFAULT_CONFIG)
        return (apply_overrides(cfg, [f"model={model}"]) if model else cfg).validate()
    if path is None:
        return recipes.general_config(data, model, pretrained)
    cfg = _load_file(Path(path))
    pretrained = pretrained or cfg.pretrained
    if pretrained:
        cfg.pretrained = pretrained
        recipes.with_pretrained(cfg, pretrained, keep_model=model is not None)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write `cfg` as a YAML recipe that `load_config(path)` (`revvit train --config`) reads back equal."""
    text = "# the effective config of this run: revvit train --config THIS_FILE reproduces it\n"
    Path(path).write_text(text + yaml.safe_dump(plain_data(cfg.to_dict()), sort_keys=False))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `key=value` strings (values typed by the field's type) and re-validate."""
    values = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}; valid keys: {', '.join(valid_keys())}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return from_dict(values, cfg).validate()
