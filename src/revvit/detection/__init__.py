"""Detection and instance segmentation with torchvision's Mask R-CNN on reversible backbones.

Data and evaluation (this layer imports only torch, torchvision, pycocotools, numpy, PIL, scikit-learn and
`revvit.data`):
    CocoDetection(root, split, transforms)   one split of a COCO 2017 layout, torchvision detection targets
    detection_train_transform(...)            flip, optional short-side resize or large-scale jitter
    detection_collate                          (images list, targets list) batches for a DataLoader
    make_digits_coco(root, ...)                the embedded default set (scikit-learn digits on canvases)
    coco_evaluate(predictions, coco_gt)        COCOeval bbox/segm AP in percent, with the printed summary

Models (these import revvit.models and revvit.interop):
    create_detector(backbone, num_classes, ...)  torchvision MaskRCNN on a Rev-MViT / MViT (FPN) or Rev-ViT
                                                 (simple pyramid) backbone, optionally pretrained
    save_detector / load_detector                the detector's weights with its options as metadata
    train_detector(cfg, out)                     the training loop behind `revvit detect train`
"""
from .backbone import MultiscaleBackbone, SimpleFeaturePyramid, build_backbone
from .coco import CategoryMap, CocoDetection, DetectionDataError, coco_paths, decode_segmentation, detection_collate
from .digits_coco import make_digits_coco
from .evaluate import CocoEvalResult, coco_evaluate, to_coco_results
from .model import create_detector, detector_from_checkpoint, load_backbone_weights, load_detector, save_detector
from .transforms import LargeScaleJitter, detection_train_transform, masks_to_boxes

__all__ = ["CategoryMap", "CocoDetection", "DetectionDataError", "coco_paths", "decode_segmentation",
           "detection_collate", "make_digits_coco", "CocoEvalResult", "coco_evaluate", "to_coco_results",
           "LargeScaleJitter", "detection_train_transform", "masks_to_boxes", "MultiscaleBackbone",
           "SimpleFeaturePyramid", "build_backbone", "create_detector", "detector_from_checkpoint",
           "load_backbone_weights", "load_detector", "save_detector"]
