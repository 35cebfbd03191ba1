"""Transforms. Images: PIL in, (C, H, W) float out, built with timm/torchvision.
Videos: uint8 frames (T, H, W, 3) in, (C, T, H, W) float out, plain tensor ops on the whole clip at once.

Train images follow the official recipe (timm: RandomResizedCrop, flip, RandAugment, random erasing);
eval images are Resize(img_size / 0.875) + CenterCrop(img_size), i.e. 256 + 224 at 224.
Mixup/cutmix and repeated augmentation are batch/sampler level and live in the training loop.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch import Tensor
from torchvision.transforms import v2

__all__ = [
    "norm_stats", "image_train_transform", "image_eval_transform",
    "frames_to_tensor", "resize_short_side", "random_scale_crop_flip", "spatial_crops", "normalize_video",
]

EVAL_CROP_PCT = 0.875  # 224 / 256
# Short-side scale jitter for video training, as ratios of the crop (SlowFast: 256..320 for a 224 crop).
VIDEO_TRAIN_SCALE = (256 / 224, 320 / 224)


def norm_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple, tuple]:
    """Mean/std with one entry per channel: kept when the lengths match, else averaged and repeated
    (so the RGB ImageNet defaults also serve 1-channel inputs)."""
    def fit(v):
        v = tuple(float(x) for x in v)
        return v if len(v) == in_chans else (sum(v) / len(v),) * in_chans
    return fit(mean), fit(std)


def image_train_transform(img_size: int, mean, std, auto_augment: Optional[str], reprob: float) -> Callable:
    """PIL -> (C, img_size, img_size): RandomResizedCrop(bicubic), hflip, RandAugment (or colour jitter 0.4
    when `auto_augment` is None), ToTensor, Normalize, RandomErasing(reprob, per-pixel noise)."""
    return create_transform(
        img_size, is_training=True, auto_augment=auto_augment, re_prob=reprob, re_mode="pixel", re_count=1,
        interpolation="bicubic", mean=mean, std=std,
    )


def image_eval_transform(img_size: int, mean, std) -> Callable:
    """PIL -> (C, img_size, img_size): Resize(short side to img_size / 0.875, bicubic) + CenterCrop."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(img_size / EVAL_CROP_PCT), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def frames_to_tensor(frames: Tensor, in_chans: int) -> Tensor:
    """uint8 (T, H, W, 3) -> float (T, in_chans, H, W) in [0, 1]; in_chans 1 averages RGB to grey."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    return x.mean(1, keepdim=True) if in_chans == 1 else x


def resize_short_side(x: Tensor, size: int) -> Tensor:
    """(T, C, H, W) -> (T, C, H', W') with min(H', W') = size, aspect kept (bilinear, antialiased)."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    out = (max(size, round(h * scale)), max(size, round(w * scale)))
    if out == (h, w):
        return x
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)


def random_scale_crop_flip(x: Tensor, img_size: int, scale=VIDEO_TRAIN_SCALE, flip: float = 0.5) -> Tensor:
    """Video train augmentation, the same for every frame: short side to a random size in
    [scale[0], scale[1]] * img_size, a random img_size² crop, a horizontal flip with probability `flip`.
    (T, C, H, W) -> (T, C, img_size, img_size)."""
    lo, hi = (int(round(s * img_size)) for s in scale)
    x = resize_short_side(x, int(torch.randint(lo, hi + 1, ()).item()))
    h, w = x.shape[-2:]
    top = int(torch.randint(0, h - img_size + 1, ()).item())
    left = int(torch.randint(0, w - img_size + 1, ()).item())
    x = x[..., top:top + img_size, left:left + img_size]
    if torch.rand(()).item() < flip:
        x = x.flip(-1)
    return x


def spatial_crops(x: Tensor, img_size: int, num_crops: int) -> list[Tensor]:
    """Video test crops of a clip whose short side is already img_size: 1 = center; 3 = start, center,
    end along the long side (left/center/right, or top/center/bottom). Each (T, C, img_size, img_size)."""
    if num_crops not in (1, 3):
        raise ValueError(f"test_crops must be 1 (center) or 3 (left/center/right), got {num_crops}")
    h, w = x.shape[-2:]
    room = max(h, w) - img_size  # slack along the long side
    offsets = [room // 2] if num_crops == 1 else [0, room // 2, room]
    short_off_h, short_off_w = (h - img_size) // 2, (w - img_size) // 2
    crops = []
    for off in offsets:
        top, left = (short_off_h, off) if w >= h else (off, short_off_w)
        crops.append(x[..., top:top + img_size, left:left + img_size])
    return crops


def normalize_video(x: Tensor, mean, std) -> Tensor:
    """(T, C, H, W) in [0, 1] -> normalised (C, T, H, W), the layout 3-D patch embeddings take."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).permute(1, 0, 2, 3).contiguous()
