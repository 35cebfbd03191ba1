"""COCO 2017 instance data for torchvision's Mask R-CNN: `DIR/{train,val}2017/` images and
`DIR/annotations/instances_{train,val}2017.json`.

Items are `(image, target)`: image float (3, H, W) in [0, 1]; target in torchvision's detection format,
`boxes` (N, 4) float xyxy pixels, `labels` (N,) int64 in 1..K (0 is the background), `masks` (N, H, W) uint8,
`image_id` int, `area` (N,) float (mask pixels, after the transform), `iscrowd` (N,) int64.

Checked when the dataset is built, each failure one `DetectionDataError` line saying what to fix:
missing annotation file or image folder, unreadable JSON, no images or no categories, an image entry whose
file is missing (named), an annotation whose image_id has no image entry, an unknown category id (named),
an annotation without a segmentation. Boxes: degenerate ones (w or h <= 0, not four finite numbers) and
ones wholly outside their image are *refused*, since they mean a broken converter, not noisy labels; boxes
partly outside are clipped to the image (COCO itself has boxes a fraction of a pixel over the edge),
counted in `clipped_boxes`. An image whose size differs from its JSON entry is refused (its masks would
not fit). Unreadable image files are named in a warning, dropped and listed in `skipped` (see
`revvit.data.common` for the up-front check and the load-time substitution, as for classification).

Crowd regions (iscrowd=1) never enter the targets, as in torchvision's references: Mask R-CNN cannot learn
from them, and COCOeval reads them from the JSON itself to ignore detections inside them.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..data.common import should_verify, warn_skipped

__all__ = ["DetectionDataError", "CategoryMap", "CocoDetection", "coco_paths", "load_coco", "decode_segmentation",
           "detection_collate"]

SPLITS = ("train", "val")


class DetectionDataError(ValueError):
    """A detection dataset that cannot be used as it is; the message says what is wrong and what to do."""


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of `split` ("train" or "val") in the COCO 2017 layout under `root`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root).expanduser()
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """The annotation file as a pycocotools `COCO`, without its prints; bad JSON -> DetectionDataError."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DetectionDataError(f"annotation file {ann_file} not found: expected the COCO 2017 layout "
                                 "DIR/annotations/instances_{train,val}2017.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetectionDataError(f"annotation file {ann_file} is not valid JSON ({e}): rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        raise DetectionDataError(f"annotation file {ann_file} is not COCO instances JSON: it needs the lists "
                                 "'images', 'categories' and 'annotations'")
    data.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DetectionDataError(f"annotation file {ann_file}: an image, annotation or category entry lacks "
                                 f"the key {e} (or is not an object): every entry needs its 'id', every annotation "
                                 "its 'image_id'") from None
    return coco


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous labels 1..K <-> COCO category ids, in increasing id order (label 0 is the background).

    `cat_ids[label - 1]` and `names[label - 1]` describe `label`; `num_classes` = K + 1 counts the background,
    as torchvision's `MaskRCNN(num_classes=...)` does."""
    cat_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, coco: COCO) -> "CategoryMap":
        """The map of the file's categories; duplicate or missing ids -> DetectionDataError."""
        cats = coco.dataset["categories"]
        ids = [c.get("id") for c in cats]
        if not ids:
            raise DetectionDataError("the annotation file has no categories: list them in 'categories'")
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
        dup = sorted({i for i in ids if ids.count(i) > 1}) if not bad else []
        if bad or dup:
            raise DetectionDataError(f"category ids must be distinct integers, got {(bad or dup)[0]!r}: "
                                     "fix 'categories' in the annotation file")
        order = sorted(range(len(cats)), key=lambda i: ids[i])
        return cls(tuple(ids[i] for i in order), tuple(str(cats[i].get("name", ids[i])) for i in order))

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids) + 1

    def label(self, cat_id: int) -> int:
        """The contiguous label of a COCO category id."""
        return self.cat_ids.index(cat_id) + 1

    def cat_id(self, label: int) -> int:
        """The COCO category id of a contiguous label (1..K)."""
        return self.cat_ids[label - 1]


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as an (H, W) uint8 0/1 mask.
    Polygons with fewer than three points are ignored, as detectron2 does (COCO has a few)."""
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE (crowd regions, usually)
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    with warnings.catch_warnings():  # pycocotools 2.0.11 under numpy 2 warns on every decode; the result is right
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def _check_box(ann: dict, img: dict, where: str) -> tuple[list[float], bool]:
    """The annotation's box as xyxy clipped to its image, and whether it was clipped.
    Degenerate or wholly outside -> DetectionDataError naming the annotation."""
    box, name = ann.get("bbox"), f"annotation {ann.get('id')} (image {img['file_name']}) in {where}"
    ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    if not ok or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
        raise DetectionDataError(f"{name} has a degenerate bbox {box} (need [x, y, w, h] with w, h > 0): "
                                 "fix or remove the annotation")
    x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
    clipped = [min(max(x0, 0), img["width"]), min(max(y0, 0), img["height"]),
               min(max(x1, 0), img["width"]), min(max(y1, 0), img["height"])]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise DetectionDataError(f"{name} has bbox {box} wholly outside its {img['width']}x{img['height']} image: "
                                 "fix or remove the annotation")
    return clipped, clipped != [x0, y0, x1, y1]


def _check_images(coco: COCO, image_dir: Path, where: str) -> None:
    """Every image entry has id, file_name, height, width and its file exists."""
    if not coco.dataset["images"]:
        raise DetectionDataError(f"no images in {where}: list the files of {image_dir} in its 'images'")
    present = set(os.listdir(image_dir))
    missing = []
    for img in coco.dataset["images"]:
        if not all(k in img for k in ("id", "file_name", "height", "width")):
            raise DetectionDataError(f"image entry {img} in {where} lacks id, file_name, height or width: add them")
        name = img["file_name"]
        if name not in present and not (image_dir / name).is_file():
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DetectionDataError(f"image file {image_dir / missing[0]}{more} listed in {where} does not exist: "
                                 f"put the images in {image_dir} or remove their entries and annotations")


def _check_annotations(coco: COCO, cats: CategoryMap, where: str) -> tuple[dict[int, list], int]:
    """{image id: [(xyxy, label, segmentation)] of its non-crowd annotations}, number of boxes clipped."""
    label_of = {c: label for label, c in enumerate(cats.cat_ids, 1)}  # a dict: COCO train has 860k annotations
    per_image: dict[int, list] = {i: [] for i in coco.imgs}
    clipped = 0
    for ann in coco.dataset["annotations"]:
        img = coco.imgs.get(ann.get("image_id"))
        if img is None:
            raise DetectionDataError(f"annotation {ann.get('id')} in {where} refers to image_id "
                                     f"{ann.get('image_id')!r}, which has no entry in 'images': add it or drop it")
        if ann.get("category_id") not in label_of:
            raise DetectionDataError(f"annotation {ann.get('id')} in {where} has unknown category id "
                                     f"{ann.get('category_id')!r} (known: {sorted(label_of)}): add it to 'categories'")
        if not ann.get("segmentation"):
            raise DetectionDataError(f"annotation {ann.get('id')} in {where} has no segmentation: Mask R-CNN needs "
                                     "a polygon or RLE mask for every annotation")
        box, was_clipped = _check_box(ann, img, where)
        clipped += was_clipped
        if not ann.get("iscrowd", 0):
            per_image[img["id"]].append((box, label_of[ann["category_id"]], ann["segmentation"]))
    return per_image, clipped


def _probe(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) of a readable image file, None if PIL cannot verify it."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except Exception:  # any PIL failure means unreadable; which one does not matter here
        return None


class CocoDetection(Dataset):
    """One split of a COCO 2017 layout; see the module docstring for the items and the checks.

    `transforms(image, target)` runs on a `tv_tensors.Image` (uint8) and a target holding `BoundingBoxes`
    and `Mask` (e.g. `detection_train_transform()`); None = the images as they are (evaluation: MaskRCNN resizes
    itself). `verify`: open every image up front (True/False; None = when at most 20,000 images).
    Attributes: `coco` (the pycocotools ground truth, for `coco_evaluate`), `categories` (a `CategoryMap`),
    `ids` (image ids in item order), `skipped` (unreadable files dropped), `clipped_boxes`, `failed`."""

    max_tries = 10

    def __init__(self, root: str | os.PathLike, split: str = "train", transforms: Optional[Callable] = None,
                 verify: Optional[bool] = None):
        self.image_dir, self.ann_file = coco_paths(root, split)
        if not self.ann_file.is_file():
            raise DetectionDataError(f"annotation file {self.ann_file} not found: expected the COCO 2017 layout "
                                     f"{Path(root)}/annotations/instances_{split}2017.json")
        if not self.image_dir.is_dir():
            raise DetectionDataError(f"image folder {self.image_dir} not found: put the {split} images there")
        where = str(self.ann_file)
        self.coco = load_coco(self.ann_file)
        self.categories = CategoryMap.from_coco(self.coco)
        _check_images(self.coco, self.image_dir, where)
        self._anns, self.clipped_boxes = _check_annotations(self.coco, self.categories, where)
        self.transforms = transforms
        self.ids = sorted(self.coco.imgs)
        self.skipped: list[str] = []
        self.failed: list[str] = []
        if should_verify(verify, len(self.ids)):
            self._verify()
        if not self.ids:
            raise DetectionDataError(f"no readable images in {self.image_dir} ({len(self.skipped)} unreadable): "
                                     "replace the broken files")

    def _verify(self) -> None:
        """Drop (and name) unreadable files; refuse files whose size differs from their JSON entry."""
        imgs = [self.coco.imgs[i] for i in self.ids]
        with ThreadPoolExecutor(max_workers=8) as pool:  # I/O-bound
            sizes = list(pool.map(_probe, [self.image_dir / im["file_name"] for im in imgs]))
        for im, size in zip(imgs, sizes):
            if size is not None and size != (im["width"], im["height"]):
                self._wrong_size(im, size)
        self.skipped = [str(self.image_dir / im["file_name"]) for im, s in zip(imgs, sizes) if s is None]
        self.ids = [im["id"] for im, s in zip(imgs, sizes) if s is not None]
        warn_skipped(self.skipped, str(self.image_dir))

    def _wrong_size(self, img: dict, size: tuple[int, int]):
        raise DetectionDataError(f"image {self.image_dir / img['file_name']} is {size[0]}x{size[1]} but "
                                 f"{self.ann_file} says {img['width']}x{img['height']}: fix its entry")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_objects(self) -> int:
        """The non-crowd annotations of the items: the ground truth AP is measured against (0: no AP)."""
        return sum(len(self._anns[i]) for i in self.ids)

    def load(self, image_id: int) -> tuple[tv_tensors.Image, dict]:
        """The image (uint8) and its untransformed target, boxes and masks as tv_tensors."""
        img = self.coco.imgs[image_id]
        with Image.open(self.image_dir / img["file_name"]) as im:
            image = TF.pil_to_tensor(im.convert("RGB"))
        h, w = image.shape[-2:]
        if (w, h) != (img["width"], img["height"]):
            self._wrong_size(img, (w, h))
        anns = self._anns[image_id]
        masks = np.stack([decode_segmentation(s, h, w) for _, _, s in anns]) if anns else np.zeros((0, h, w), np.uint8)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor([b for b, _, _ in anns], dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([lab for _, lab, _ in anns], dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "image_id": image_id,
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        return tv_tensors.Image(image), target

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        for k in range(min(self.max_tries, len(self.ids))):
            image_id = self.ids[(index + k) % len(self.ids)]
            try:
                image, target = self.load(image_id)
                break
            except DetectionDataError:
                raise
            except Exception as e:  # a decoder error: record and substitute the next image, never crash the epoch
                path = str(self.image_dir / self.coco.imgs[image_id]["file_name"])
                if path not in self.failed:
                    self.failed.append(path)
                    warnings.warn(f"skipping unreadable file {path}: {type(e).__name__}: {e}", stacklevel=2)
        else:
            raise RuntimeError(f"{self.max_tries} consecutive images from index {index} failed to load; "
                               f"first failures: {self.failed[:3]}. Check the dataset files.")
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return _finish(image, target)


def _finish(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Float image in [0, 1], plain tensors (not tv_tensors) in the target, area = mask pixels."""
    image = image.as_subclass(Tensor).float().div_(255)
    out = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
    out["area"] = out["masks"].flatten(1).sum(1, dtype=torch.float32) if len(out["masks"]) else torch.zeros(0)
    return image, out


def detection_collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    """(list of images, list of targets): MaskRCNN takes lists, as images differ in size."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
