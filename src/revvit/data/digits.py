"""The built-in datasets: scikit-learn's 8×8 handwritten digits (1797 images, 10 classes, no download).

Split: 20% stratified held-out test set, seeded (seed 0 by default), so every run evaluates on the
same 360 images and never trains on them. The 8×8 originals (values 0..16) stay in memory; each item
is upsampled on the fly (bilinear), which costs microseconds and avoids holding img_size² copies.

digits (image): (in_chans, img_size, img_size). Train augmentation is a small random affine (±10°,
±10% shift, 0.9-1.1 scale): no flips, digits are not mirror-invariant; no RandAugment.

digits-video: a digit, drawn at three quarters of the frame size, glides in a straight line across a black frame,
bouncing off the edges, from a random start position, direction and speed; label = the digit (10
classes). A small model learns it within minutes (any frame shows the digit), while the clips still
exercise the video path: temporal sampling at `sampling_rate`, (C, T, H, W) items, multi-view eval.
Each clip is a trajectory over a source video twice the clip span long; train clips start at random
(fresh trajectory per access when augmenting, else fixed per index), val clips are `test_clips`
uniformly spaced starts with seeded trajectories. The frame is the whole view, so the `test_crops`
spatial views are identical copies (kept so V = clips × crops like real videos).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .video import clip_span

__all__ = ["DIGIT_CLASSES", "digits_split", "DigitsImages", "DigitsVideo"]

DIGIT_CLASSES = [str(d) for d in range(10)]


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, tuple[Tensor, Tensor, np.ndarray]]:
    """{"train"|"val": (images (N, 1, 8, 8) float in [0, 1], labels (N,) int64, indices into load_digits)}."""
    d = load_digits()
    idx = np.arange(len(d.target))
    train_idx, val_idx = train_test_split(idx, test_size=test_fraction, stratify=d.target, random_state=seed)
    images = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(d.target).long()
    return {name: (images[i], labels[i], i) for name, i in (("train", np.sort(train_idx)), ("val", np.sort(val_idx)))}


def _upsample(img: Tensor, size: int) -> Tensor:
    """(1, h, w) -> (1, size, size), bilinear, values kept in [0, 1]."""
    return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp_(0, 1)


def _normalise(x: Tensor, mean, std, in_chans: int) -> Tensor:
    """Grey (1, ...) in [0, 1] -> (in_chans, ...), channel c normalised with mean[c], std[c]."""
    shape = (in_chans,) + (1,) * (x.dim() - 1)
    m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
    return (x.expand(in_chans, *x.shape[1:]) - m) / s


class DigitsImages(Dataset):
    """Digits as images: item (in_chans, img_size, img_size) float, int label."""

    def __init__(self, images: Tensor, labels: Tensor, img_size: int, in_chans: int, mean, std, augment: bool):
        self.images, self.labels = images, labels
        self.img_size, self.in_chans, self.mean, self.std = img_size, in_chans, mean, std
        self.augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = _upsample(self.images[i], self.img_size)
        if self.augment is not None:
            x = self.augment(x)  # fill 0 = the digits' black background
        return _normalise(x, self.mean, self.std, self.in_chans), int(self.labels[i])


def _reflect(p: Tensor, hi: float) -> Tensor:
    """Positions bounced back into [0, hi] (a straight path reflected at the walls)."""
    if hi <= 0:
        return torch.zeros_like(p)
    p = torch.remainder(p, 2 * hi)
    return torch.where(p > hi, 2 * hi - p, p)


class DigitsVideo(Dataset):
    """Moving digits: item (in_chans, num_frames, S, S) with `views` None, else (views * crops, C, T, S, S)."""

    def __init__(self, images: Tensor, labels: Tensor, img_size: int, in_chans: int, mean, std,
                 num_frames: int, sampling_rate: int, random: bool, views: int | None = None, crops: int = 1,
                 seed: int = 0):
        self.images, self.labels = images, labels
        self.img_size, self.in_chans, self.mean, self.std = img_size, in_chans, mean, std
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.random, self.views, self.crops, self.seed = random, views, crops, seed
        self.span = clip_span(num_frames, sampling_rate)
        self.length = 2 * self.span  # source video length in frames
        self.side = max(img_size * 3 // 4, 4)  # large enough for a tiny ViT to learn in a few CPU minutes

    def __len__(self) -> int:
        return len(self.labels)

    def _trajectory(self, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Start (2,) in pixels and velocity (2,) in pixels per source frame: during one clip the digit
        travels 0.5-1 times the free width (room), so consecutive sampled frames differ visibly."""
        room = self.img_size - self.side
        start = torch.rand(2, generator=g) * room
        angle = torch.rand((), generator=g) * 2 * math.pi
        speed = (0.5 + 0.5 * torch.rand((), generator=g)) * room / self.span
        return start, speed * torch.stack([torch.cos(angle), torch.sin(angle)])

    def _render(self, digit: Tensor, start: Tensor, velocity: Tensor, times: list[int]) -> Tensor:
        """(1, T, S, S) in [0, 1]: the digit pasted at its (rounded) position at each source time."""
        room = self.img_size - self.side
        t = torch.tensor(times, dtype=torch.float32)[:, None]
        pos = _reflect(start + velocity * t, room).round().long()  # (T, 2) = (top, left)
        video = torch.zeros(1, len(times), self.img_size, self.img_size)
        for k, (top, left) in enumerate(pos.tolist()):
            video[0, k, top:top + self.side, left:left + self.side] = digit
        return video

    def __getitem__(self, i: int):
        g = None if self.random else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start, velocity = self._trajectory(g)
        digit = _upsample(self.images[i], self.side)[0]
        room_t = self.length - self.span
        if self.views is None:
            t0 = int(torch.randint(0, room_t + 1, (), generator=g).item())
            clip = self._render(digit, start, velocity, list(range(t0, t0 + self.span, self.sampling_rate)))
            return _normalise(clip, self.mean, self.std, self.in_chans), int(self.labels[i])
        starts = [room_t // 2] if self.views == 1 else [round(room_t * v / (self.views - 1)) for v in range(self.views)]
        clips = [_normalise(self._render(digit, start, velocity, list(range(t0, t0 + self.span, self.sampling_rate))),
                            self.mean, self.std, self.in_chans) for t0 in starts]
        return torch.stack([c for c in clips for _ in range(self.crops)]), int(self.labels[i])
