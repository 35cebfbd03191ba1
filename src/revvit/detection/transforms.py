"""Training augmentation for detection, applied jointly to the image, its boxes and its masks.

The recipes: MViTv2 (Detectron2 projects/MViTv2) resizes the short side to a random 480..800 (long side at
most 1333) and flips; ViTDet uses large-scale jitter (a random scale 0.1..2.0 of a fixed square size, then
a crop or a bottom-right pad to that square) and flips. torchvision's `transforms.v2` does the flip, the
resize and the scale jitter on `tv_tensors` (boxes and masks follow the image); the crop-or-pad and the
boxes recomputed from the cropped masks (ViTDet's `recompute_boxes`: a cropped box must shrink to what of
the object is left) are written here. Empty instances are removed at the end.

The multi-scale short-side resize is also what `MaskRCNN(min_size=(480, ..., 800), max_size=1333)` does by
itself in training (`GeneralizedRCNNTransform` picks one `min_size` per batch), so `short_sides` is off by
default.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["detection_train_transform", "LargeScaleJitter", "masks_to_boxes"]

MVIT_SHORT_SIDES = tuple(range(480, 801, 32))  # Detectron2 MViTv2 / ViTDet non-LSJ: 480..800 step 32


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) masks -> (N, 4) float xyxy boxes that tightly enclose them (x1, y1 exclusive, as COCO's
    boxes cover whole pixels); an empty mask gives a zero box, which sanitising removes."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W): which rows / columns hold the object
    h, w = masks.shape[-2:]
    x0, y0 = cols.byte().argmax(1), rows.byte().argmax(1)  # first True
    x1, y1 = w - cols.flip(1).byte().argmax(1), h - rows.flip(1).byte().argmax(1)  # one past the last True
    return torch.stack([x0, y0, x1, y1], 1).float() * rows.any(1, keepdim=True)


class LargeScaleJitter:
    """Resize by a random factor in `scale_range` of the scale fitting the image into `size`x`size`, then crop
    a random `size`x`size` window, padding at the bottom/right (zeros) where the image is smaller, as ViTDet
    does. Boxes are recomputed from the cropped masks. Call on (tv_tensors.Image, target dict)."""

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.1, 2.0)):
        self.size = size
        self.jitter = v2.ScaleJitter((size, size), scale_range=scale_range)

    def __call__(self, image: tv_tensors.Image, target: dict) -> tuple[tv_tensors.Image, dict]:
        image, target = self.jitter(image, target)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, max(h - self.size, 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.size, 0) + 1, ()))
        # F.crop pads with zeros past the image edge: a window at (top, left) >= 0 pads bottom/right only
        crop = dict(top=top, left=left, height=self.size, width=self.size)
        image = TF.crop(image, **crop)
        target = dict(target, masks=TF.crop(target["masks"], **crop))
        target["boxes"] = tv_tensors.BoundingBoxes(masks_to_boxes(target["masks"]), format="XYXY",
                                                   canvas_size=(self.size, self.size))
        return image, target


def _labels_and_crowd(inputs) -> tuple[Tensor, Tensor]:
    """What SanitizeBoundingBoxes filters with the boxes (it finds the masks by itself)."""
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def detection_train_transform(hflip: float = 0.5, short_sides: Optional[Sequence[int]] = None,
                              max_size: int = 1333, lsj_size: Optional[int] = None,
                              lsj_scale: tuple[float, float] = (0.1, 2.0)) -> v2.Compose:
    """The training augmentation for `CocoDetection(transforms=...)`: horizontal flip with probability `hflip`;
    `short_sides` (e.g. `MVIT_SHORT_SIDES`): resize the short side to one of them, long side at most
    `max_size`; `lsj_size`: large-scale jitter to that square (e.g. 1024). Boxes are clipped to the image and
    empty ones (with their labels and masks) dropped."""
    steps = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if short_sides:
        steps.append(v2.RandomShortestSize(list(short_sides), max_size=max_size))
    if lsj_size:
        steps.append(LargeScaleJitter(lsj_size, lsj_scale))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd)]
    return v2.Compose(steps)
