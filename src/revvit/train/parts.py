"""The parts a run is built from: the model, the data spec, the training sampler, mixup; and the errors."""
from __future__ import annotations

from typing import Optional

import timm
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from ..data import DataSpec
from .config import TrainConfig
from .distributed import DistInfo

__all__ = ["TrainError", "TrainingDiverged", "AMP_DTYPES", "create_run_model", "data_spec", "train_sampler",
           "mixup_fn", "check_data_kind"]

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to change."""


class TrainingDiverged(TrainError):
    pass


def known_models() -> list[str]:
    return timm.list_models(["rev_*", "mvit_*"])


def create_run_model(cfg: TrainConfig, num_classes: int, img_size: int, in_chans: int,
                     num_frames: Optional[int] = None) -> tuple[nn.Module, dict]:
    """timm.create_model with the data's classes/size/channels; returns (model, the kwargs used)."""
    if cfg.model not in timm.list_models():
        raise TrainError(f"unknown model {cfg.model!r}. revvit models: {', '.join(known_models())} "
                         f"(timm has {len(timm.list_models())} others: timm.list_models())")
    asked = cfg.model_kwargs.get("num_classes", num_classes)
    if asked != num_classes:
        raise TrainError(f"model_kwargs.num_classes={asked!r} but the data has {num_classes} classes: drop it "
                         "(the classifier is sized from the data)")
    kwargs = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, drop_path_rate=cfg.drop_path)
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model_kwargs.items()})  # YAML lists
    try:
        model = timm.create_model(cfg.model, **kwargs)
    except TypeError as e:
        raise TrainError(f"cannot build {cfg.model} with {kwargs}: {e}") from None
    except ValueError as e:  # e.g. an img_size the patch size does not divide
        raise TrainError(f"cannot build {cfg.model}: {e}; change img_size or model_kwargs") from None
    if hasattr(model, "set_backprop"):
        model.set_backprop(cfg.backprop)
    return model, kwargs


def check_data_kind(model_kwargs: dict, kind: str, path, data: str) -> None:
    """TrainError when a video model (built with num_frames) meets image data, or an image model video data."""
    frames = model_kwargs.get("num_frames") or 1
    video = frames > 1 or model_kwargs.get("patch_2d") is False  # image MViTs record num_frames=1, patch_2d
    if video and kind == "image":
        raise TrainError(f"{path} is a video model ({frames}-frame clips) but {data} holds images: evaluate it on "
                         "video data (digits-video, or a folder with train/val video lists)")
    if not video and kind == "video":
        raise TrainError(f"{path} is an image model but {data} holds videos: evaluate it on images "
                         "(digits, or a folder with train/ and val/ class folders)")


def data_spec(cfg: TrainConfig, path: Optional[str] = None, model_name: Optional[str] = None) -> DataSpec:
    """The data settings of `cfg`, normalised with the model's own mean/std (timm's pretrained_cfg:
    ImageNet statistics for images, 0.45/0.225 for the Kinetics models)."""
    norm = {}
    pretrained = timm.models.get_pretrained_cfg(model_name or cfg.model)
    if pretrained is not None and pretrained.mean is not None:
        norm = dict(mean=tuple(pretrained.mean), std=tuple(pretrained.std))
    return DataSpec.with_options(cfg, path=path or cfg.data, verify=cfg.verify_data, **norm)


def train_sampler(cfg: TrainConfig, dataset, d: DistInfo):
    if cfg.repeated_aug > 1:
        return RepeatAugSampler(dataset, num_replicas=d.world_size, rank=d.rank, num_repeats=cfg.repeated_aug)
    return DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=cfg.seed,
                              drop_last=True)


def mixup_fn(cfg: TrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                num_classes=num_classes)

    def apply(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 5:  # video (B, C, T, H, W): timm cuts boxes in the last two dims of 4-D input
            b, c, t, h, w = x.shape
            x, y = mix(x.reshape(b, c * t, h, w), y)
            return x.reshape(b, c, t, h, w), y
        return mix(x, y)

    return apply
