"""Detection and instance segmentation with torchvision's Mask R-CNN on reversible backbones.

Data and evaluation (this layer imports only torch, torchvision, pycocotools, numpy, PIL, scikit-learn and
`revvit.data`):
    CocoDetection(root, split, transforms)   one split of a COCO 2017 layout, torchvision detection targets
    detection_train_transform(...)            flip, optional short-side resize or large-scale jitter
    detection_collate                          (images list, targets list) batches for a DataLoader
    make_digits_coco(root, ...)                the embedded default set (scikit-learn digits on canvases)
    coco_evaluate(predictions, coco_gt)        COCOeval bbox/segm AP in percent, with the printed summary
"""
from .coco import CategoryMap, CocoDetection, DetectionDataError, coco_paths, decode_segmentation, detection_collate
from .digits_coco import make_digits_coco
from .evaluate import CocoEvalResult, coco_evaluate, to_coco_results
from .transforms import LargeScaleJitter, detection_train_transform, masks_to_boxes

__all__ = ["CategoryMap", "CocoDetection", "DetectionDataError", "coco_paths", "decode_segmentation",
           "detection_collate", "make_digits_coco", "CocoEvalResult", "coco_evaluate", "to_coco_results",
           "LargeScaleJitter", "detection_train_transform", "masks_to_boxes"]
