"""Kinetics-style video lists decoded with PyAV.

Layout (one convention): a folder holding `train.csv` and `val.csv` (or `train.txt` / `val.txt`), and
optionally `classes.txt` (line i = name of label i). Lines are `path,label` (.csv, an optional
`path,label` header) or `path label` (.txt, whitespace). Labels are integers from 0; relative paths are
relative to the list's folder. Without classes.txt, num_classes = largest label + 1.

Sampling (SlowFast's): a clip is `num_frames` frames `sampling_rate` apart, spanning
(num_frames - 1) * sampling_rate + 1 source frames; a video shorter than that repeats its last frame.
Train: a random start, then (with `auto_augment`) RandAugment with the same ops on every frame, random
short-side scale + crop + flip, normalisation, and (with `reprob`) one erased box through all frames
-> (C, T, H, W), the official Kinetics recipe.
Val: `test_clips` uniformly spaced starts × `test_crops` crops of the short-side-resized clip
-> (V, C, T, H, W), V = clips × crops, clip-major; predictions are averaged over V.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Optional, Sequence

import av
import numpy as np
import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from .common import SkippingDataset, run_transform
from .transforms import (
    frames_to_tensor,
    normalize_video,
    random_erase_cube,
    random_scale_crop_flip,
    resize_short_side,
    spatial_crops,
    video_rand_augment,
)

__all__ = [
    "LIST_FORMATS", "find_video_lists", "lists_images", "read_video_list", "read_class_names",
    "decode_frames", "verify_video",
    "clip_span", "clip_indices", "VideoClipDataset", "VideoViewsDataset",
]

LIST_FORMATS = (".csv", ".txt")


def find_video_lists(root: Path, splits: Sequence[str] = ("train", "val")) -> Optional[dict[str, Path]]:
    """{split: list} for `splits` if ROOT holds a list for the first of them (train, or val when only val is
    asked for); None if it holds none. ValueError if a split has two lists, an unknown format (e.g. train.json),
    or the other asked-for list is missing."""
    key = splits[0]
    lists = {}
    for split in splits:
        found = sorted(p for p in root.glob(f"{split}.*") if p.is_file())
        known = [p for p in found if p.suffix.lower() in LIST_FORMATS]
        if len(known) > 1:
            raise ValueError(f"both {known[0].name} and {known[1].name} in {root}: keep one {split} list")
        if not known and found and split == key and not (root / split).is_dir():
            raise ValueError(f"unknown list format {found[0].name} in {root}: video lists must be "
                             f"{split}.csv ('path,label' lines) or {split}.txt ('path label' lines)")
        if known:
            lists[split] = known[0]
    if key not in lists:
        return None
    missing = [s for s in splits if s not in lists]
    if missing:
        raise ValueError(f"found {lists[key].name} but no {missing[0]}.csv / {missing[0]}.txt in {root}: "
                         "a video dataset needs both lists")
    return lists


def lists_images(path: Path) -> bool:
    """True when the list's first entry is an image file (an ImageNet-style train.txt, not a video list)."""
    with open(path) as f:
        first = next((line for line in f if line.strip()), "")
    entry = first.split(",")[0] if path.suffix.lower() == ".csv" else (first.split() or [""])[0]
    return Path(entry.strip()).suffix.lower() in IMG_EXTENSIONS


def read_video_list(path: Path) -> list[tuple[str, int]]:
    """[(absolute video path, label)] from a .csv or .txt list. ValueError naming file:line on a bad line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LIST_FORMATS:
        raise ValueError(f"unknown list format {path.name}: use .csv ('path,label') or .txt ('path label')")
    with open(path, newline="") as f:
        rows = list(csv.reader(f)) if suffix == ".csv" else [line.rsplit(None, 1) for line in f]
    samples = []
    for lineno, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if not row or not any(row):
            continue
        if lineno == 1 and len(row) == 2 and row[1].lower() == "label":
            continue  # csv header
        if len(row) != 2 or not row[0]:
            expected = "path,label" if suffix == ".csv" else "path label"
            raise ValueError(f"{path}:{lineno}: expected '{expected}', got {row}")
        try:
            label = int(row[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: label {row[1]!r} is not an integer (labels are 0..num_classes-1; "
                             "put class names in classes.txt)") from None
        if label < 0:
            raise ValueError(f"{path}:{lineno}: negative label {label}")
        video = Path(row[0])
        samples.append((str(video if video.is_absolute() else path.parent / video), label))
    return samples


def read_class_names(root: Path) -> Optional[list[str]]:
    """Names from ROOT/classes.txt (line i = label i), or None when there is no such file."""
    f = root / "classes.txt"
    return [line.strip() for line in f.read_text().splitlines() if line.strip()] if f.is_file() else None


def _frame_count(container, stream) -> int:
    """The stream's frame count from its header, else estimated from duration × rate; 0 if unknown."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate and stream.duration and stream.time_base:
        return int(stream.duration * stream.time_base * rate)
    if rate and container.duration:
        return int(container.duration / av.time_base * rate)
    return 0


def decode_frames(path: str, pick: Callable[[int], list[int]]) -> Tensor:
    """Decode only the frames `pick(num_frames_in_video)` asks for, in that order (repeats allowed):
    uint8 (len(indices), H, W, 3). Decoding stops after the last index needed. Indices past the true end
    (header counts can overestimate) get the last decoded frame."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n = _frame_count(container, stream)
        if n <= 0:  # unknown length: decode everything once
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if not frames:
                raise ValueError(f"{path}: no frames decoded")
            return torch.from_numpy(np.stack([frames[min(i, len(frames) - 1)] for i in pick(len(frames))]))
        indices = pick(n)
        needed, stop = set(indices), max(indices)
        got, last, count = {}, None, 0
        for i, frame in enumerate(container.decode(stream)):
            if i in needed:
                got[i] = frame.to_ndarray(format="rgb24")
            last, count = frame, i + 1
            if i >= stop:
                break
        if last is None:
            raise ValueError(f"{path}: no frames decoded")
        tail = got.get(count - 1)
        if tail is None:
            tail = last.to_ndarray(format="rgb24")
        return torch.from_numpy(np.stack([got.get(i, tail) if i < count else tail for i in indices]))


def verify_video(path: str) -> None:
    """Raise unless the file opens and its first video frame decodes."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        next(container.decode(container.streams.video[0]))


def clip_span(num_frames: int, sampling_rate: int) -> int:
    """Source frames covered by one clip."""
    return (num_frames - 1) * sampling_rate + 1


def clip_indices(start: int, num_frames: int, sampling_rate: int, n: int) -> list[int]:
    """`num_frames` indices from `start`, `sampling_rate` apart, clamped to the video's last frame n - 1."""
    return [min(start + k * sampling_rate, n - 1) for k in range(num_frames)]


def _starts(n: int, span: int, clips: int) -> list[int]:
    """`clips` uniformly spaced clip starts covering the video (one clip: the centred one)."""
    room = max(n - span, 0)
    return [room // 2] if clips == 1 else [round(room * i / (clips - 1)) for i in range(clips)]


class _VideoDataset(SkippingDataset):
    def __init__(self, samples, num_frames: int, sampling_rate: int, img_size: int, in_chans: int, mean, std):
        super().__init__(samples)
        if in_chans not in (1, 3):
            raise ValueError(f"videos are decoded as RGB: in_chans must be 3 (or 1 for grey), got {in_chans}")
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.img_size, self.in_chans, self.mean, self.std = img_size, in_chans, mean, std
        self.span = clip_span(num_frames, sampling_rate)


class VideoClipDataset(_VideoDataset):
    """One clip per video -> (C, num_frames, img_size, img_size). `augment`: random start, scale, crop,
    flip, plus RandAugment (`auto_augment`, a timm string; None: off) and cube random erasing with
    probability `reprob`; otherwise the centred clip, short side resized and center-cropped (deterministic)."""

    def __init__(self, *args, augment: bool = True, auto_augment: Optional[str] = None, reprob: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.augment = augment
        self.rand_augment = (video_rand_augment(auto_augment, self.mean, self.img_size) if augment and auto_augment
                             else None)
        self.reprob = reprob if augment else 0.0

    def _pick(self, n: int) -> list[int]:
        if self.augment:
            start = int(torch.randint(0, max(n - self.span, 0) + 1, ()).item())
        else:
            start = _starts(n, self.span, 1)[0]
        return clip_indices(start, self.num_frames, self.sampling_rate, n)

    def load(self, path: str) -> Tensor:
        frames = decode_frames(path, self._pick)  # uint8 (T, H, W, 3)
        if self.rand_augment is not None:
            frames = run_transform(self.rand_augment, frames, path)
        x = frames_to_tensor(frames, self.in_chans)  # (T, C, H, W)
        if self.augment:
            x = random_scale_crop_flip(x, self.img_size)
        else:
            x = spatial_crops(resize_short_side(x, self.img_size), self.img_size, 1)[0]
        return random_erase_cube(normalize_video(x, self.mean, self.std), self.reprob)


class VideoViewsDataset(_VideoDataset):
    """All test views of a video -> (clips * crops, C, num_frames, img_size, img_size), clip-major.
    The video is decoded once for all clips."""

    def __init__(self, *args, clips: int = 5, crops: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if crops not in (1, 3):
            raise ValueError(f"test_crops must be 1 (center) or 3 (left/center/right), got {crops}")
        self.clips, self.crops = clips, crops

    def _pick(self, n: int) -> list[int]:
        starts = _starts(n, self.span, self.clips)
        return [i for s in starts for i in clip_indices(s, self.num_frames, self.sampling_rate, n)]

    def load(self, path: str) -> Tensor:
        x = frames_to_tensor(decode_frames(path, self._pick), self.in_chans)  # (clips * T, C, H, W)
        x = resize_short_side(x, self.img_size)
        views = []
        for clip in x.split(self.num_frames):
            views += [normalize_video(c, self.mean, self.std) for c in spatial_crops(clip, self.img_size, self.crops)]
        return torch.stack(views)
