"""Transforms. Images: PIL in, (C, H, W) float out, built with timm/torchvision.
Videos: uint8 frames (T, H, W, 3) in, (C, T, H, W) float out, plain tensor ops on the whole clip at once.

Train images follow the official recipe (timm: RandomResizedCrop, flip, RandAugment, random erasing);
eval images are Resize(img_size / 0.875) + CenterCrop(img_size), i.e. 256 + 224 at 224.
Train videos follow the official Kinetics recipe (SlowFast/pyslowfast): timm's RandAugment with the same
ops and magnitudes on every frame of a clip, then scale jitter, crop and flip, normalisation, and random
erasing of one box through all frames (a cube).
Mixup/cutmix and repeated augmentation are batch/sampler level and live in the training loop.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import rand_augment_transform
from torch import Tensor
from torchvision.transforms import v2

__all__ = [
    "norm_stats", "image_train_transform", "image_eval_transform",
    "frames_to_tensor", "resize_short_side", "random_scale_crop_flip", "spatial_crops", "normalize_video",
    "video_rand_augment", "random_erase_cube", "safe_posterize",
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
    transform = create_transform(
        img_size, is_training=True, auto_augment=auto_augment, re_prob=reprob, re_mode="pixel", re_count=1,
        interpolation="bicubic", mean=mean, std=std,
    )
    for step in getattr(transform, "transforms", []):
        safe_posterize(step)
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for any bit count: Pillow >= 12 refuses 0 bits (timm's RandAugment draws them at high
    magnitude with mstd), which keeps no bit: a black image, as older Pillow gave."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def safe_posterize(augment) -> None:
    """Route a timm RandAugment's posterize ops through `_posterize` (other transforms are left as they are)."""
    for op in getattr(augment, "ops", []):
        if getattr(op, "name", "").startswith("Posterize"):
            op.aug_fn = _posterize


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


def video_rand_augment(auto_augment: str, mean, img_size: int) -> Callable[[Tensor], Tensor]:
    """timm's RandAugment (`auto_augment`, e.g. "rand-m7-n4-mstd0.5-inc1") for a clip: uint8 frames
    (T, H, W, 3) -> the same, every frame given the SAME ops and magnitudes, so motion is not turned into noise.

    How: timm draws the ops from numpy's global RNG and their probabilities, magnitudes, signs and
    interpolations from Python's `random`. Both states are taken before the first frame and put back before
    each frame, so every frame replays the first frame's draws; afterwards the RNGs stand where one image's
    augmentation leaves them. `mean` (in [0, 1]) is the fill colour of rotate/shear/translate, as in timm."""
    fill = tuple(min(255, round(255 * m)) for m in mean)
    fill = fill * 3 if len(fill) == 1 else fill  # frames are RGB here, before any grey conversion
    augment = rand_augment_transform(auto_augment, dict(translate_const=int(img_size * 0.45), img_mean=fill))
    safe_posterize(augment)

    def apply(frames: Tensor) -> Tensor:
        py_state, np_state = random.getstate(), np.random.get_state()
        out = []
        for frame in frames.numpy():
            random.setstate(py_state)
            np.random.set_state(np_state)
            out.append(np.asarray(augment(Image.fromarray(frame))))
        return torch.from_numpy(np.stack(out))

    return apply


def random_erase_cube(x: Tensor, prob: float, area: tuple = (0.02, 1 / 3), aspect: tuple = (0.3, 1 / 0.3),
                      tries: int = 10) -> Tensor:
    """Random erasing for a normalised clip (C, T, H, W), timm's defaults in 3-D: with probability `prob`, one
    box of random area (a fraction in `area` of the frame) and aspect ratio (log-uniform in `aspect`), the same
    box in every frame, filled with per-pixel standard normal noise (timm's mode "pixel"). Returns a new tensor."""
    if prob <= 0 or torch.rand(()).item() >= prob:
        return x
    h, w = x.shape[-2:]
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(tries):
        target = h * w * torch.empty(()).uniform_(*area).item()
        ratio = math.exp(torch.empty(()).uniform_(*log_aspect).item())
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, ()).item())
            left = int(torch.randint(0, w - ew + 1, ()).item())
            x = x.clone()
            x[..., top:top + eh, left:left + ew] = torch.randn(x.shape[:-2] + (eh, ew), dtype=x.dtype)
            return x
    return x
