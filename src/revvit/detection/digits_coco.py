"""The embedded detection default: a small COCO 2017-layout instance set drawn from scikit-learn's 8x8 digits,
so `revvit detect train` runs with no download.

Each canvas holds 1..4 digits (a few canvases none) at random sizes and places, strokes not touching and
boxes overlapping little (IoU <= 0.3), each in a random bright colour over a dim noisy background. A digit's
mask is its upscaled strokes (intensity > 0.5) and its box the tight box of that mask, so boxes and masks
agree exactly. Masks are stored three ways in turn, polygons, compressed RLE and uncompressed RLE, so every
decoding path of a real COCO file is exercised; polygons are unions of one-row rectangles (one per run of
stroke pixels), which pycocotools rasterises back to exactly the same pixels and which, unlike outline
polygons, keep the holes of 0, 6, 8 and 9. Category ids are 1, 3, ..., 19 for "0".."9": not contiguous, so
the label <-> category mapping is exercised too. Train and val canvases draw from the disjoint train and
held-out digits of `revvit.data.digits.digits_split`, so val digits are unseen glyphs.

The set is written to a temporary folder beside `root` and renamed into place, with `digits_coco.json`
(the arguments) written last: an interrupted build never leaves a half set that looks complete, and a later
call with the same arguments reuses the set.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..data.digits import digits_split
from .coco import DetectionDataError

__all__ = ["make_digits_coco", "CATEGORY_IDS", "MARKER"]

CATEGORY_IDS = tuple(2 * d + 1 for d in range(10))  # digit d -> COCO category id 2d + 1
MARKER = "digits_coco.json"
VERSION = 1  # bump when the drawing changes, so old sets are rebuilt
MAX_BOX_IOU = 0.3


def _glyph(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit in [0, 1] upscaled (bilinear) to size x size, values in [0, 1]."""
    img = Image.fromarray(digit.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(img), 0.0, 1.0)


def _box_iou(a, b) -> float:
    """IoU of two xyxy boxes."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _tight_box(mask: np.ndarray) -> list[int]:
    """xyxy (x1, y1 exclusive) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _draw_canvas(rng, glyphs, labels, canvas: int, count: int, sizes) -> tuple[np.ndarray, list]:
    """One RGB canvas with up to `count` digits; [(label, mask)] of those placed."""
    image = rng.uniform(0, 40, (canvas, canvas, 3)) * rng.uniform(0.5, 1.0, 3)  # dim noise, tinted
    taken = np.zeros((canvas, canvas), bool)
    placed, boxes = [], []
    for _ in range(count):
        k = int(rng.integers(len(labels)))
        size = int(rng.integers(sizes[0], min(sizes[1], canvas) + 1))
        alpha = _glyph(glyphs[k], size)
        if not (alpha > 0.5).any():
            continue
        for _try in range(20):  # rejection sampling of the place; a crowded canvas just gets fewer digits
            y, x = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
            full = np.zeros((canvas, canvas), np.float64)
            full[y:y + size, x:x + size] = alpha
            mask = full > 0.5
            box = _tight_box(mask)
            if not (mask & taken).any() and all(_box_iou(box, b) <= MAX_BOX_IOU for b in boxes):
                break
        else:
            continue
        colour = rng.uniform(120, 255, 3)
        image = image * (1 - full[..., None]) + colour * full[..., None]
        taken |= mask
        boxes.append(box)
        placed.append((int(labels[k]), mask.astype(np.uint8)))
    return image.round().clip(0, 255).astype(np.uint8), placed


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """The mask as a union of one-row rectangles, one per run of set pixels (COCO polygon format)."""
    polys = []
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.r_[0, row, 0]))
        for x0, x1 in zip(edges[::2], edges[1::2]):
            polys.append([float(v) for v in (x0, y, x1, y, x1, y + 1, x0, y + 1)])
    return polys


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    bounds = np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def _encode(mask: np.ndarray, style: int):
    """Segmentation in one of three styles: 0 polygons, 1 compressed RLE, 2 uncompressed RLE."""
    if style == 0:
        return _polygons(mask)
    if style == 1:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}
    return _uncompressed_rle(mask)


def _write_split(out: Path, split: str, glyphs, labels, num: int, canvas: int, sizes, rng) -> None:
    """Images into out/{split}2017/ and their annotations into out/annotations/instances_{split}2017.json."""
    image_dir = out / f"{split}2017"
    image_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(num):
        # every image carries 1..4 digits, except a few (about 1 in 20, and always the last one) with none
        count = 0 if i == num - 1 or rng.random() < 0.05 else int(rng.integers(1, 5))
        pixels, placed = _draw_canvas(rng, glyphs, labels, canvas, count, sizes)
        image_id, name = i + 1, f"{i + 1:06d}.png"
        Image.fromarray(pixels).save(image_dir / name, compress_level=1)
        images.append({"id": image_id, "file_name": name, "height": canvas, "width": canvas})
        for label, mask in placed:
            x0, y0, x1, y1 = _tight_box(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0,
                         "segmentation": _encode(mask, len(anns) % 3)})
    categories = [{"id": CATEGORY_IDS[d], "name": str(d), "supercategory": "digit"} for d in range(10)]
    data = {"info": {"description": "revvit digits COCO (scikit-learn digits on canvases)"}, "licenses": [],
            "images": images, "annotations": anns, "categories": categories}
    (out / "annotations").mkdir(exist_ok=True)
    with open(out / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(data, f)


def _is_complete(root: Path, spec: dict) -> bool:
    """Whether `root` holds a finished set built with `spec`."""
    try:
        return json.loads((root / MARKER).read_text()) == spec
    except (OSError, ValueError):
        return False


def _install(tmp: Path, root: Path, spec: dict) -> None:
    """Rename the finished `tmp` to `root`, replacing an older digits set (never a foreign folder)."""
    if _is_complete(root, spec):  # another process (a torchrun rank) finished first: keep its set, it may be read
        return
    old = None
    if root.exists() and any(root.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
        os.replace(root, old / "set")
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_complete(root, spec):  # as above, between the check and the rename
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def make_digits_coco(root: str | os.PathLike, num_train: int = 500, num_val: int = 100, canvas: int = 64,
                     digit_size: tuple[int, int] = (12, 32), seed: int = 0) -> Path:
    """Build (or reuse) the digits detection set in the COCO 2017 layout under `root`; returns `root`.

    `canvas`: square image side in pixels; `digit_size`: (min, max) side of a drawn digit; deterministic for
    a seed. A few seconds for the defaults on one CPU core."""
    root = Path(root).expanduser()
    if num_train < 1 or num_val < 1 or not 8 <= digit_size[0] <= digit_size[1] <= canvas:
        raise ValueError(f"need num_train, num_val >= 1 and 8 <= digit_size[0] <= digit_size[1] <= canvas, "
                         f"got {num_train}, {num_val}, {digit_size}, canvas {canvas}")
    spec = {"version": VERSION, "num_train": num_train, "num_val": num_val, "canvas": canvas,
            "digit_size": list(digit_size), "seed": seed}
    if _is_complete(root, spec):
        return root
    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DetectionDataError(f"{root} exists and is not a digits COCO set: give an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp.", dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        split = digits_split(seed)
        for name, num in (("train", num_train), ("val", num_val)):
            glyphs, labels = split[name][0][:, 0].numpy(), split[name][1].numpy()
            _write_split(tmp, name, glyphs, labels, num, canvas, digit_size, rng)
        (tmp / MARKER).write_text(json.dumps(spec))  # last: its presence means the set is complete
        _install(tmp, root, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
