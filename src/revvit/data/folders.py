"""Image folders in the ImageNet layout: `ROOT/train/<class>/<image>` and `ROOT/val/<class>/<image>`.

Class names are the sorted folder names (label = index), taken from train/ and required to be the same
set in val/; when only val/ is built (evaluation), they are val/'s folder names. Files whose extension
torchvision does not list as an image are ignored; images PIL cannot open are skipped and named (see `common`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .common import SkippingDataset, find_unreadable, run_transform, should_verify

__all__ = ["ImageFolderDataset", "load_image_folder", "scan_image_folder", "check_class_sets", "verify_image"]


def scan_image_folder(split_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Sorted class names and, per class, its sorted image paths. Raises ValueError if there are no
    class subfolders (a flat folder of images, e.g. raw ImageNet val, must be sorted into classes)."""
    entries = [e for e in os.scandir(split_dir) if not e.name.startswith(".")]
    if not entries:
        raise ValueError(f"{split_dir} is empty, no class folders: put the images in {split_dir}/<class>/, "
                         "one subfolder per class (the same classes as the other split)")
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>, "
                         "one subfolder per class (sort a flat image folder into class subfolders first)")
    files = {}
    for name in classes:
        files[name] = sorted(
            str(p) for p in (split_dir / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")
        )
    return classes, files


def check_class_sets(train: list[str], val: list[str], root: Path) -> None:
    """ValueError naming the differences when train/ and val/ do not hold the same class folders."""
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    if only_train or only_val:
        raise ValueError(f"class folders differ between {root}/train and {root}/val "
                         f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'}); "
                         "both splits need the same class subfolders so labels mean the same thing")


def verify_image(path: str) -> None:
    """Raise if PIL cannot identify the file or its structure is broken (reads headers/chunks, not pixels)."""
    with Image.open(path) as im:
        im.verify()


class ImageFolderDataset(SkippingDataset):
    """(path, label) images -> (transform(PIL image), label); PIL mode RGB for 3 channels, L for 1."""

    def __init__(self, samples, transform: Callable, in_chans: int = 3):
        super().__init__(samples)
        self.transform = transform
        self.mode = {1: "L", 3: "RGB"}[in_chans]

    def load(self, path: str):
        with Image.open(path) as im:
            image = im.convert(self.mode)  # decoded here: a failure so far is the file's
        return run_transform(self.transform, image, path)


def load_image_folder(root: Path, verify: Optional[bool], splits: Sequence[str] = ("train", "val")
                      ) -> tuple[list[str], dict[str, list], list[str], dict[str, int]]:
    """Scan and check ROOT/<split> for each of `splits`: (classes, {split: samples}, skipped paths,
    {split: file count} of the splits not verified up front; `verify` None = by size, see `common`).
    Raises ValueError for missing/empty splits, differing class sets, or a class left without train images."""
    out, skipped, unchecked, classes = {}, [], {}, None
    for split in splits:
        names, files = scan_image_folder(root / split)
        if classes is None:
            classes = names
        else:
            check_class_sets(classes, names, root)
        paths = [p for name in names for p in files[name]]
        bad = set()
        if should_verify(verify, len(paths)):
            bad = set(find_unreadable(paths, verify_image))
        else:
            unchecked[split] = len(paths)
        skipped += [p for p in paths if p in bad]
        label_of = {name: i for i, name in enumerate(classes)}
        out[split] = [(p, label_of[name]) for name in names for p in files[name] if p not in bad]
        if not out[split]:
            raise ValueError(f"no readable images in {root / split} ({len(bad)} unreadable): "
                             f"put images ({', '.join(sorted(IMG_EXTENSIONS)[:6])}, ...) in {root / split}/<class>/")
    if "train" in out:
        empty = sorted(set(classes) - {classes[label] for _, label in out["train"]})
        if empty:
            raise ValueError(f"classes with no readable training images in {root / 'train'}: {empty}; "
                             "add images or remove those class folders from both train/ and val/")
    return classes, out, skipped, unchecked
