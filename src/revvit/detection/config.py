"""The settings of `revvit detect train`: one dataclass, read from a YAML recipe (configs/detection/*.yaml)
and `key=value` overrides. The defaults are the embedded demo: a tiny Rev-MViT Mask R-CNN on the digits COCO
set, a few minutes on 2 CPU cores."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import yaml

__all__ = ["DetectionConfig", "DetectionConfigError", "load_detection_config", "apply_detection_overrides",
           "detection_config", "saved_detection_config"]


class DetectionConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and what is accepted."""


@dataclass
class DetectionConfig:
    # model (see revvit.detection.create_detector)
    backbone: str = "rev_mvit_tiny"
    backbone_kwargs: dict = field(default_factory=lambda: dict(stage_depths=[1, 2, 2, 2], embed_dim=16,
                                                                drop_path_rate=0.0))
    pretrained: Optional[str] = None  # classification checkpoint (.pyth or revvit .safetensors) for the backbone
    backprop: str = "reversible"
    out_channels: int = 32  # FPN / simple-pyramid width
    anchor_sizes: Optional[list] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # None: torchvision's
    box_head_dim: int = 64
    mask_head_dim: int = 16
    detector_kwargs: dict = field(default_factory=lambda: dict(rpn_batch_size_per_image=32,
                                                               box_batch_size_per_image=32, box_detections_per_img=20))
    # data: None = the embedded digits set, built under OUT/digits_coco
    data: Optional[str] = None
    digits: dict = field(default_factory=lambda: dict(num_train=400, num_val=100, canvas=64))
    min_size: list = field(default_factory=lambda: [64])  # short side(s): one drawn per batch; the last for eval
    max_size: int = 64  # long side cap (--img-size)
    hflip: float = 0.0  # digits are not mirror-symmetric
    lsj_size: Optional[int] = None  # large-scale jitter to this square (ViTDet)
    lsj_scale: list = field(default_factory=lambda: [0.1, 2.0])
    workers: int = 0
    # optimisation: AdamW, linear warmup, step decay
    epochs: int = 6
    max_iters: Optional[int] = None  # >= 1: the run's length in iterations instead of `epochs`; None: epochs
    batch_size: int = 4  # global (all processes together)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_iters: int = 20
    warmup_factor: float = 0.001
    lr_steps: list = field(default_factory=lambda: [0.75])  # <= 1: fraction of the run; > 1: iteration
    lr_decay: float = 0.1
    grad_clip: Optional[float] = None
    amp: Optional[str] = None  # "bf16" or "fp16"
    seed: int = 0
    eval_every: int = 0  # epochs between evaluations; 0: at the end only
    keep_checkpoints: int = 2
    device: str = "auto"
    # torch CPU threads (None: torch's default). The demo's tensors are tiny: one thread is fastest (measured
    # 0.3 s vs 2 s per step with 2 threads on 2 busy cores: OpenMP threads wait on each other)
    threads: Optional[int] = 1

    def check(self) -> "DetectionConfig":
        """Refuse any setting that cannot run (DetectionConfigError naming the key and what it takes) before
        anything is built or written; numbers written as text ("1e-3", a string to YAML) are converted."""
        for key in ("backbone", "backprop"):
            _need(isinstance(getattr(self, key), str) and bool(getattr(self, key)), key, "a name", getattr(self, key))
        _need(self.backprop in ("reversible", "parallel", "autograd"), "backprop", "reversible, parallel or autograd",
              self.backprop)
        _need(self.amp in (None, "bf16", "fp16"), "amp", "bf16, fp16 or none", self.amp)
        for key in ("pretrained", "data"):
            _need(getattr(self, key) is None or isinstance(getattr(self, key), str), key, "a path or none",
                  getattr(self, key))
        for key in ("backbone_kwargs", "detector_kwargs", "digits"):
            _need(isinstance(getattr(self, key), dict), key, f"a mapping ({key}.NAME=VALUE sets one entry)",
                  getattr(self, key))
        for key, least in WHOLE.items():
            _need(_whole(getattr(self, key), least), key, f"a whole number >= {least}", getattr(self, key))
        for key, (least, unset) in WHOLE_OR_NONE.items():
            value = getattr(self, key)
            _need(value is None or _whole(value, least), key, f"a whole number >= {least}, or none ({unset})", value)
        for key, (fits, what) in NUMBERS.items():
            setattr(self, key, _number(key, getattr(self, key), fits, what))
        if self.grad_clip is not None:
            self.grad_clip = _number("grad_clip", self.grad_clip, _positive, "a number > 0, or none (no clipping)")
        if _whole(self.min_size, 1):
            self.min_size = [self.min_size]
        _need(isinstance(self.min_size, list) and bool(self.min_size) and all(_whole(s, 1) for s in self.min_size),
              "min_size", "a whole number >= 1 or a list of them (short sides)", self.min_size)
        _need(self.anchor_sizes is None or (isinstance(self.anchor_sizes, list) and len(self.anchor_sizes) == 5
                                            and all(_whole(s, 1) for s in self.anchor_sizes)),
              "anchor_sizes", "5 whole numbers >= 1 (one per pyramid level), or none", self.anchor_sizes)
        self.lr_steps = _numbers("lr_steps", self.lr_steps, "a list of numbers > 0 (<= 1: a fraction of the run; "
                                                            "> 1: an iteration)")
        scale = "[min, max]: two numbers > 0 with min <= max"
        self.lsj_scale = _numbers("lsj_scale", self.lsj_scale, scale)
        _need(len(self.lsj_scale) == 2 and self.lsj_scale[0] <= self.lsj_scale[1], "lsj_scale", scale, self.lsj_scale)
        _need(isinstance(self.device, str) and bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)), "device",
              "auto, cpu, cuda or cuda:N", self.device)
        _check_digits(self.digits)
        return self

    def set_img_size(self, size: int) -> None:
        """--img-size: the longer image side in training and evaluation; short sides are capped by it."""
        self.max_size = int(size)
        self.min_size = [min(int(s), self.max_size) for s in self.min_size]
        if self.lsj_size:
            self.lsj_size = self.max_size


# the whole-number settings and their least value; then those that may be none (and what none means)
WHOLE = {"out_channels": 1, "box_head_dim": 1, "mask_head_dim": 1, "max_size": 1, "workers": 0, "epochs": 1,
         "batch_size": 1, "warmup_iters": 0, "seed": 0, "eval_every": 0, "keep_checkpoints": 1}
WHOLE_OR_NONE = {"lsj_size": (1, "no large-scale jitter"), "max_iters": (1, "train for `epochs`"),
                 "threads": (1, "torch's default")}


def _positive(x: float) -> bool:
    return x > 0


def _fraction(x: float) -> bool:
    return 0 <= x <= 1


# the other numbers: (the test a finite value must pass, what the key takes)
NUMBERS = {"hflip": (_fraction, "a probability from 0 to 1"), "lr": (_positive, "a number > 0"),
           "weight_decay": (lambda x: x >= 0, "a number >= 0"), "warmup_factor": (_fraction, "a number from 0 to 1"),
           "lr_decay": (_positive, "a number > 0")}
DIGITS_KEYS = ("num_train", "num_val", "canvas", "digit_size", "seed")  # make_digits_coco's arguments


def _need(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise DetectionConfigError(f"{key} must be {what}, got {value!r}")


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(key: str, value: Any, fits: Callable[[float], bool], what: str) -> float:
    """`value` (a number, or a number written as text) as a finite float that `fits`."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    _need(math.isfinite(number) and fits(number), key, what, value)
    return value if isinstance(value, (int, float)) else number  # 52500 stays an int in config.yaml


def _numbers(key: str, values: Any, what: str) -> list[float]:
    """A list of numbers > 0."""
    _need(isinstance(values, list), key, what, values)
    return [_number(key, v, _positive, what) for v in values]


def _check_digits(digits: dict) -> None:
    """The keys and types of `digits` (make_digits_coco checks how they fit together)."""
    unknown = sorted(set(digits) - set(DIGITS_KEYS))
    if unknown:
        raise DetectionConfigError(f"digits: unknown key(s) {unknown}; known: {', '.join(DIGITS_KEYS)}")
    for key, value in digits.items():
        if key == "digit_size":
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_whole(v, 1) for v in value)
            _need(ok, "digits.digit_size", "[min, max]: the smallest and largest digit side in pixels", value)
        else:
            _need(_whole(value, 0), f"digits.{key}", "a whole number >= 0", value)


def _names() -> list[str]:
    return [f.name for f in fields(DetectionConfig)]


def _from_dict(base: DetectionConfig, values: dict, where: str) -> DetectionConfig:
    unknown = sorted(set(values) - set(_names()))
    if unknown:
        raise DetectionConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(_names())}")
    return dataclasses.replace(base, **values)


def load_detection_config(path: Optional[str | os.PathLike],
                          base: Optional[DetectionConfig] = None) -> DetectionConfig:
    """`base` (default: the defaults; resuming: the run's own config), updated by the keys the YAML recipe at
    `path` sets (None: none)."""
    cfg = base if base is not None else DetectionConfig()
    if path is None:
        return cfg
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise DetectionConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise DetectionConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise DetectionConfigError(f"config file {path} must hold a mapping of settings")
    return _from_dict(cfg, values, str(path))


def apply_detection_overrides(cfg: DetectionConfig, overrides: Sequence[str]) -> DetectionConfig:
    """`key=value` (YAML-typed values; `backbone_kwargs.NAME=VALUE` sets one entry of a dict field)."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise DetectionConfigError(f"overrides are key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        key, _, sub = key.partition(".")
        if sub:
            current = values.get(key, getattr(cfg, key, None))
            if not isinstance(current, dict):
                raise DetectionConfigError(f"{key}.{sub}: {key} is not a mapping setting")
            values[key] = {**current, sub: value}
        else:
            values[key] = value
    return _from_dict(cfg, values, "override")


def saved_detection_config(values: dict) -> DetectionConfig:
    """A run's config as its checkpoint stored it (`dataclasses.asdict`); keys this version lacks are dropped."""
    return dataclasses.replace(DetectionConfig(), **{k: v for k, v in values.items() if k in _names()})


def detection_config(path: Optional[str | os.PathLike], overrides: Sequence[str], flags: Optional[dict] = None,
                     base: Optional[DetectionConfig] = None) -> DetectionConfig:
    """The config `revvit detect train` runs: `base` (default: the defaults; resuming: the run's own config),
    then the keys the recipe at `path` sets, then `overrides` (key=value), then the `flags` given (not None;
    "img_size" through `set_img_size`)."""
    cfg = apply_detection_overrides(load_detection_config(path, base), overrides)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    img_size = flags.pop("img_size", None)
    cfg = _from_dict(cfg, flags, "flags")
    if img_size is not None:
        cfg.check().set_img_size(img_size)
    return cfg
