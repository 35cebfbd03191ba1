"""COCO AP of Mask R-CNN predictions with pycocotools' `COCOeval` (bbox and segm).

Predictions are torchvision MaskRCNN outputs in eval mode, one dict per image at the original image size
(`boxes` (N, 4) xyxy, `labels` (N,) contiguous 1..K, `scores` (N,), `masks` (N, 1, H, W) probabilities),
keyed by COCO image id. They become COCO results (xywh boxes, category ids mapped back through the
dataset's `CategoryMap`, masks thresholded at 0.5 and RLE-encoded), and COCOeval runs on exactly the
images predicted, so a subset or a dataset with skipped files is evaluated on what was seen; an image the
model saw but found nothing in must still be there, with empty outputs.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco import CategoryMap, DetectionDataError

__all__ = ["coco_evaluate", "CocoEvalResult", "to_coco_results", "METRIC_NAMES"]

# COCOeval.stats in order: AP@[.5:.95], AP@.5, AP@.75, AP small/medium/large, AR@1/10/100, AR small/medium/large
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


@dataclass
class CocoEvalResult:
    """`metrics[iou_type][name]` in percent (NaN where COCOeval has no ground truth, e.g. no small objects);
    `summaries[iou_type]`: the text COCOeval's `summarize()` prints."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """Every type's pycocotools summary, each under a heading, for a CLI to print."""
        return "\n".join(f"IoU type {t}:\n{s.rstrip()}" for t, s in self.summaries.items())

    def ap_line(self) -> str:
        """`bbox AP <x>  segm AP <y>` (AP@[.5:.95] in percent), the last line `revvit detect eval` prints."""
        return "  ".join(f"{t} AP {m['AP']:.2f}" for t, m in self.metrics.items())


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_coco_results(predictions: Mapping[int, dict], categories: CategoryMap, iou_type: str,
                    coco_gt: Optional[COCO] = None, mask_threshold: float = 0.5) -> list[dict]:
    """COCO result dicts of one `iou_type` ("bbox": xywh boxes; "segm": compressed RLE of masks > threshold).
    With `coco_gt`, mask sizes are checked against the images' sizes."""
    results = []
    for image_id, out in predictions.items():
        scores = _as_numpy(out["scores"]).astype(float)
        cat_ids = [categories.cat_id(int(lab)) for lab in _as_numpy(out["labels"])]
        if iou_type == "bbox":
            boxes = _as_numpy(out["boxes"]).astype(float).reshape(-1, 4)
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            results += [{"image_id": image_id, "category_id": c, "bbox": b.tolist(), "score": s}
                        for b, c, s in zip(boxes, cat_ids, scores)]
            continue
        masks = _as_numpy(out["masks"])
        masks = masks.reshape(len(scores), *masks.shape[-2:]) > mask_threshold  # (N, 1, H, W) -> (N, H, W)
        if coco_gt is not None and len(masks):
            img = coco_gt.imgs[image_id]
            if masks.shape[-2:] != (img["height"], img["width"]):
                raise DetectionDataError(f"masks of image {image_id} are {masks.shape[-2]}x{masks.shape[-1]} (HxW) "
                                         f"but the image is {img['height']}x{img['width']}: give masks at the "
                                         "original size (MaskRCNN in eval mode does)")
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
        for rle, c, s in zip(rles, cat_ids, scores):
            rle["counts"] = rle["counts"].decode("ascii")  # bytes -> str, as in COCO JSON
            results.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    return results


def _run_cocoeval(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> tuple[list, str]:
    """COCOeval stats (fractions) and the summary text, nothing printed."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):  # loadRes, evaluate and accumulate print progress
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    return list(ev.stats), summary.getvalue()


def coco_evaluate(predictions: Mapping[int, dict], coco_gt: COCO, iou_types: Sequence[str] = IOU_TYPES,
                  categories: Optional[CategoryMap] = None, verbose: bool = False) -> CocoEvalResult:
    """COCO AP of `predictions` ({image id: MaskRCNN output}) against `coco_gt` (`CocoDetection.coco`).

    `categories` maps labels back to category ids; None = `CategoryMap.from_coco(coco_gt)`, the dataset's own
    rule. No detections at all gives AP 0 for every metric (COCOeval cannot load an empty result list).
    `verbose` prints the summaries; they are in the result either way."""
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou_types must be among {IOU_TYPES}, got {unknown}")
    missing = [i for i in predictions if i not in coco_gt.imgs]
    if missing:
        raise DetectionDataError(f"predictions for image id {missing[0]}, which the ground truth does not have: "
                                 "evaluate against the annotation file of the images predicted")
    categories = categories or CategoryMap.from_coco(coco_gt)
    image_ids = sorted(predictions)
    result = CocoEvalResult()
    for iou_type in iou_types:
        results = to_coco_results(predictions, categories, iou_type, coco_gt)
        if results:
            stats, text = _run_cocoeval(coco_gt, results, iou_type, image_ids)
        else:
            stats, text = [0.0] * len(METRIC_NAMES), f"no {iou_type} detections in {len(image_ids)} images: AP 0\n"
        # COCOeval marks "no ground truth in this area range" with -1: NaN says so without faking a score
        result.metrics[iou_type] = {n: 100.0 * s if s >= 0 else float("nan") for n, s in zip(METRIC_NAMES, stats)}
        result.summaries[iou_type] = text
    if verbose:
        print(result.summary)
    return result
