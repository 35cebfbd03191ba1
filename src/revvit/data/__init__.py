"""Datasets for revvit: `build_datasets(DataSpec(...)) -> DataBundle` of train/val datasets
(`build_datasets(spec, splits=("val",))` builds only val, for evaluation: the train split is not scanned).

`DataSpec.path` picks the source:
    None or "digits"   scikit-learn's 8×8 digits as images (1797, 10 classes, seeded 80/20 split)
    "digits-video"     the same digits moving across frames, label = the digit (see `digits`)
    DIR with train.csv / val.csv (or .txt)   Kinetics-style video lists (see `video`); checked first,
                       because video folders often also hold train/<class>/ folders of clips
                       (a train list whose first entry is an image file is not a video list)
    DIR with train/ and val/ class subfolders   images in the ImageNet layout (see `folders`)

Items: image (C, H, W); video train (C, T, H, W); video val (V, C, T, H, W), V = test_clips × test_crops
views whose predictions the evaluator averages. Labels are ints.

Unreadable files: a verified split has every file opened once before training; the failures are dropped,
warned about by name and listed in `DataBundle.skipped`. Files that still fail when decoded (in any split)
are substituted by the next sample and warned about, so training never crashes on one file. `verify`:
True/False for every split; None (default) verifies a split of at most `common.VERIFY_MAX_FILES` (20,000)
files and leaves a larger one (ImageNet, Kinetics train) to the load-time substitution alone, recording it in
`DataBundle.unchecked` so the caller can say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from .common import find_unreadable, should_verify, warn_skipped
from .digits import DIGIT_CLASSES, DigitsImages, DigitsVideo, digits_split
from .folders import ImageFolderDataset, load_image_folder
from .transforms import image_eval_transform, image_train_transform, norm_stats
from .video import (
    VideoClipDataset,
    VideoViewsDataset,
    find_video_lists,
    lists_images,
    read_class_names,
    read_video_list,
    verify_video,
)

__all__ = ["DataOptions", "DataSpec", "DataBundle", "build_datasets"]

BUILTIN = ("digits", "digits-video")


@dataclass(kw_only=True)
class DataOptions:
    """How to sample and transform the data: the settings a training config shares with `DataSpec`
    (`revvit.train.TrainConfig` inherits them, so a recipe sets them by these names)."""
    img_size: int = 224
    in_chans: int = 3
    num_frames: int = 16  # video: frames per clip
    sampling_rate: int = 4  # video: source frames between sampled frames
    train_aug: bool = True  # False: eval transforms for train too (deterministic runs, tests)
    # timm RandAugment string; None disables. Images: per image; video lists: the same ops on every frame
    # of a clip. (The digits datasets keep their own simple augmentation.)
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25  # random erasing probability (images; video lists: one box through all frames)
    test_clips: int = 5  # video eval: uniformly spaced temporal clips
    test_crops: int = 1  # video eval: 1 (center) or 3 (left/center/right) spatial crops


@dataclass
class DataSpec(DataOptions):
    """What to load (see the module docstring for `path`) and how to transform it (the `DataOptions`,
    keyword-only: `DataSpec(path, img_size=32)`)."""
    path: Optional[str] = None
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    verify: Optional[bool] = None  # open every file up front, dropping unreadable ones; None: if <= 20,000
    seed: int = 0  # digits: the held-out split and the val clips

    @classmethod
    def with_options(cls, options: DataOptions, **spec) -> "DataSpec":
        """A spec taking every `DataOptions` field from `options` (a TrainConfig, say), the rest from `spec`."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(DataOptions)}, **spec)


@dataclass
class DataBundle:
    train: Optional[Dataset]  # None when not among the splits built
    val: Optional[Dataset]
    num_classes: int
    in_chans: int
    kind: str  # "image" | "video"
    class_names: list[str]
    img_size: int
    num_frames: Optional[int]
    skipped: list[str] = field(default_factory=list)  # unreadable files dropped before training
    unchecked: dict[str, int] = field(default_factory=dict)  # split -> file count, for splits not verified up front


def build_datasets(spec: DataSpec, splits: Sequence[str] = ("train", "val")) -> DataBundle:
    """Build the datasets of `splits` ("train" and/or "val"; a split not asked for is None in the bundle and
    its files are never touched) for `spec`. Raises FileNotFoundError for a missing path and ValueError,
    saying what to fix, for anything that would otherwise fail later (empty splits, class mismatch, bad lists)."""
    unknown = sorted(set(splits) - {"train", "val"})
    if unknown or not splits:
        raise ValueError(f"splits must be 'train' and/or 'val', got {list(splits)}")
    splits = tuple(s for s in ("train", "val") if s in splits)
    for name in ("img_size", "in_chans", "num_frames", "sampling_rate", "test_clips"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if spec.test_crops not in (1, 3):
        raise ValueError(f"test_crops must be 1 (center crop) or 3 (left/center/right crops), got {spec.test_crops}")
    mean, std = norm_stats(spec.mean, spec.std, spec.in_chans)
    source = spec.path or "digits"
    if source == "digits":
        return _digits(spec, splits, mean, std)
    if source == "digits-video":
        return _digits_video(spec, splits, mean, std)
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (built-in datasets: {', '.join(BUILTIN)})")
    if root.is_file():
        raise ValueError(f"data path {root} is a file: give the folder holding train.csv and val.csv "
                         "(or train.txt / val.txt) for videos, or train/ and val/ class folders for images")
    lists = find_video_lists(root, splits)
    if lists is not None and not lists_images(lists[splits[0]]):
        return _video_lists(spec, root, lists, splits, mean, std)
    if all((root / split).is_dir() for split in splits):
        return _image_folders(spec, root, splits, mean, std)
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    if present:
        missing = [s for s in splits if s not in present]
        raise ValueError(f"{root} has {present[0]}/ but no {missing[0]}/: an image dataset needs both train/ and val/ "
                         f"with the same class subfolders; create {root / missing[0]}/<class>/ with images")
    folders, files = " and ".join(f"{s}/" for s in splits), " and ".join(f"{s}.csv" for s in splits)
    raise ValueError(f"{root} is neither an image dataset ({folders} folders with one subfolder per class) "
                     f"nor a video dataset ({files}, or .txt, listing 'path label')")


def _digits(spec: DataSpec, splits, mean, std) -> DataBundle:
    split = digits_split(spec.seed)
    common = dict(img_size=spec.img_size, in_chans=spec.in_chans, mean=mean, std=std)
    return DataBundle(
        train=DigitsImages(*split["train"][:2], augment=spec.train_aug, **common) if "train" in splits else None,
        val=DigitsImages(*split["val"][:2], augment=False, **common) if "val" in splits else None,
        num_classes=10, in_chans=spec.in_chans, kind="image", class_names=list(DIGIT_CLASSES),
        img_size=spec.img_size, num_frames=None,
    )


def _digits_video(spec: DataSpec, splits, mean, std) -> DataBundle:
    split = digits_split(spec.seed)
    common = dict(img_size=spec.img_size, in_chans=spec.in_chans, mean=mean, std=std,
                  num_frames=spec.num_frames, sampling_rate=spec.sampling_rate, seed=spec.seed)
    return DataBundle(
        train=DigitsVideo(*split["train"][:2], random=spec.train_aug, **common) if "train" in splits else None,
        val=(DigitsVideo(*split["val"][:2], random=False, views=spec.test_clips, crops=spec.test_crops, **common)
             if "val" in splits else None),
        num_classes=10, in_chans=spec.in_chans, kind="video", class_names=list(DIGIT_CLASSES),
        img_size=spec.img_size, num_frames=spec.num_frames,
    )


def _image_folders(spec: DataSpec, root: Path, splits, mean, std) -> DataBundle:
    if spec.in_chans not in (1, 3):
        raise ValueError(f"image folders are read as RGB (in_chans 3) or grey (in_chans 1), got {spec.in_chans}")
    classes, samples, skipped, unchecked = load_image_folder(root, spec.verify, splits)
    warn_skipped(skipped, str(root))
    eval_tf = image_eval_transform(spec.img_size, mean, std)
    train_tf = (image_train_transform(spec.img_size, mean, std, spec.auto_augment, spec.reprob)
                if spec.train_aug else eval_tf)
    return DataBundle(
        train=ImageFolderDataset(samples["train"], train_tf, spec.in_chans) if "train" in samples else None,
        val=ImageFolderDataset(samples["val"], eval_tf, spec.in_chans) if "val" in samples else None,
        num_classes=len(classes), in_chans=spec.in_chans, kind="image", class_names=classes,
        img_size=spec.img_size, num_frames=None, skipped=skipped, unchecked=unchecked,
    )


def _video_lists(spec: DataSpec, root: Path, lists: dict, splits, mean, std) -> DataBundle:
    samples = {split: read_video_list(lists[split]) for split in splits}
    names = read_class_names(root)
    if names is not None:
        num_classes = len(names)
    else:  # the largest label + 1, over the train list too when only val is built (its text: no video is opened)
        labels = [label for s in samples.values() for _, label in s]
        if "train" not in samples:
            train_list = find_video_lists(root)
            labels += [label for _, label in read_video_list(train_list["train"])] if train_list else []
        num_classes = 1 + max(labels, default=-1)
    for split, items in samples.items():
        out = [(p, label) for p, label in items if label >= num_classes]
        if out:
            raise ValueError(f"{lists[split]}: label {out[0][1]} ({out[0][0]}) is out of range for "
                             f"{num_classes} classes in {root / 'classes.txt'}; labels are 0..{num_classes - 1}")
    skipped, unchecked = [], {}
    for split in splits:
        if should_verify(spec.verify, len(samples[split])):
            bad = set(find_unreadable([p for p, _ in samples[split]], verify_video))
            skipped += [p for p, _ in samples[split] if p in bad]
            samples[split] = [(p, label) for p, label in samples[split] if p not in bad]
        else:
            unchecked[split] = len(samples[split])
        if not samples[split]:
            raise ValueError(f"no readable videos in {lists[split]}: list 'path label' lines of existing videos")
    skipped = list(dict.fromkeys(skipped))  # a file in both lists (or twice in one) is named once
    warn_skipped(skipped, str(root))
    common = dict(num_frames=spec.num_frames, sampling_rate=spec.sampling_rate, img_size=spec.img_size,
                  in_chans=spec.in_chans, mean=mean, std=std)
    train = None
    if "train" in samples:
        train = VideoClipDataset(samples["train"], augment=spec.train_aug, auto_augment=spec.auto_augment,
                                 reprob=spec.reprob, **common)
    val = None
    if "val" in samples:
        val = VideoViewsDataset(samples["val"], clips=spec.test_clips, crops=spec.test_crops, **common)
    return DataBundle(
        train=train, val=val, num_classes=num_classes, in_chans=spec.in_chans, kind="video",
        class_names=names if names is not None else [str(i) for i in range(num_classes)],
        img_size=spec.img_size, num_frames=spec.num_frames, skipped=skipped, unchecked=unchecked,
    )
