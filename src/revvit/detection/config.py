"""The settings of `revvit detect train`: one dataclass, read from a YAML recipe (configs/detection/*.yaml)
and `key=value` overrides. The defaults are the embedded demo: a tiny Rev-MViT Mask R-CNN on the digits COCO
set, a few minutes on 2 CPU cores."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

import yaml

__all__ = ["DetectionConfig", "DetectionConfigError", "load_detection_config", "apply_detection_overrides"]


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
    max_iters: Optional[int] = None  # overrides epochs when set
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
        if self.amp not in (None, "bf16", "fp16"):
            raise DetectionConfigError(f"amp must be bf16, fp16 or none, got {self.amp!r}")
        if self.backprop not in ("reversible", "parallel", "autograd"):
            raise DetectionConfigError(f"backprop must be reversible, parallel or autograd, got {self.backprop!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise DetectionConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if isinstance(self.min_size, int):
            self.min_size = [self.min_size]
        if not self.min_size or min(self.min_size) < 1 or self.max_size < 1:
            raise DetectionConfigError(f"min_size and max_size must be positive, got {self.min_size}, {self.max_size}")
        return self

    def set_img_size(self, size: int) -> None:
        """--img-size: the longer image side in training and evaluation; short sides are capped by it."""
        self.max_size = int(size)
        self.min_size = [min(int(s), self.max_size) for s in self.min_size]
        if self.lsj_size:
            self.lsj_size = self.max_size


def _names() -> list[str]:
    return [f.name for f in fields(DetectionConfig)]


def _from_dict(base: DetectionConfig, values: dict, where: str) -> DetectionConfig:
    unknown = sorted(set(values) - set(_names()))
    if unknown:
        raise DetectionConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(_names())}")
    return dataclasses.replace(base, **values)


def load_detection_config(path: Optional[str | os.PathLike]) -> DetectionConfig:
    """The defaults, updated by the YAML recipe at `path` (None: the defaults)."""
    cfg = DetectionConfig()
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
