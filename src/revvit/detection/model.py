"""`create_detector`: torchvision's Mask R-CNN on a revvit backbone, with pretrained classification weights,
and the detector's own weights file.

    det = create_detector("rev_mvit_base", num_classes=81, pretrained="REV_MVIT_B.pyth")
    losses = det(images, targets)             # train mode: torchvision's loss dict
    out = det.eval()(images)                  # [{"boxes", "labels", "scores", "masks"}] per image
    save_detector(det, "det.safetensors"); det = load_detector("det.safetensors")

The options that rebuild a detector (`detector_options(det)`) are stored as the file's metadata.
"""
from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..interop import load as load_weights
from ..interop import model_spec, read_metadata, save
from ..io import CheckpointError, saved_by_torch
from ..layers import resample_pos_embed
from ..models import set_backprop
from .backbone import build_backbone

__all__ = ["create_detector", "check_detector_kwargs", "load_backbone_weights", "detector_options", "save_detector",
           "load_detector", "detector_from_checkpoint"]

TASK = "detection"


def _anchor_generator(sizes: Optional[Sequence[int]]) -> Optional[AnchorGenerator]:
    """One anchor size per pyramid level ("0".."3", "pool"), aspect ratios 0.5, 1, 2; None: torchvision's
    default (32, 64, 128, 256, 512)."""
    if sizes is None:
        return None
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per pyramid level (5), got {sizes}")
    return AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)


# the MaskRCNN options create_detector sets itself (from its own arguments)
_SET_HERE = ("backbone", "num_classes", "min_size", "max_size", "rpn_anchor_generator", "box_head", "box_predictor",
             "mask_head", "mask_predictor")


def check_detector_kwargs(detector_kwargs: Mapping[str, Any]) -> None:
    """ValueError naming the keys MaskRCNN does not take (it would ignore them silently: its **kwargs go to
    GeneralizedRCNNTransform, which drops what it does not know) or that create_detector sets itself."""
    taken = {*inspect.signature(MaskRCNN.__init__).parameters,
             *inspect.signature(GeneralizedRCNNTransform.__init__).parameters} - {"self", "kwargs", *_SET_HERE}
    own = sorted(k for k in detector_kwargs if k in _SET_HERE)
    if own:
        raise ValueError(f"detector_kwargs: {own} are set by their own settings (min_size, max_size, anchor_sizes, "
                         "box_head_dim, mask_head_dim; the classes come from the data), not here")
    unknown = sorted(k for k in detector_kwargs if k not in taken)
    if unknown:
        raise ValueError(f"detector_kwargs: unknown option(s) {unknown}; torchvision's MaskRCNN takes: "
                         f"{', '.join(sorted(taken))}")


def create_detector(backbone: str | nn.Module, num_classes: int, *, min_size: int | Sequence[int] = 800,
                    max_size: int = 1333, pretrained: Optional[str | os.PathLike] = None, out_channels: int = 256,
                    anchor_sizes: Optional[Sequence[int]] = None, box_head_dim: int = 1024, mask_head_dim: int = 256,
                    backprop: str = "reversible",
                    detector_kwargs: Optional[Mapping[str, Any]] = None, **backbone_kwargs) -> MaskRCNN:
    """A `torchvision.models.detection.MaskRCNN` on a revvit backbone.

    `backbone`: a registered timm name of a revvit model (Rev-MViT or MViT with 4 stages: an FPN over the
    stages; Rev-ViT with patch 16: ViTDet's simple pyramid), created with `dynamic_img_size=True`, no
    classifier and `backbone_kwargs`; or such a model itself. `num_classes` counts the background, as
    torchvision does. `min_size`/`max_size`: torchvision's resize of each image (short side, long side cap).
    `pretrained`: an official SlowFast classification checkpoint (.pyth) or a revvit weights file
    (.safetensors): backbone weights loaded, classifier dropped, position embeddings resized; anything
    unmapped is reported by name (see `load_backbone_weights`). `anchor_sizes`: one per level (5);
    `box_head_dim` (the box head's MLP width) and `mask_head_dim` (its 4 convs' width): torchvision's 1024
    and 256 by default, smaller for CPU-sized detectors; `detector_kwargs`: more MaskRCNN options (e.g.
    `box_detections_per_img`). `backprop` is set on every reversible model inside (`revvit.set_backprop`).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background: need at least 2, got {num_classes}")
    check_detector_kwargs(detector_kwargs or {})
    if isinstance(backbone, str):
        if not timm.is_model(backbone):
            raise ValueError(f"unknown backbone {backbone!r}: give a registered revvit model, e.g. rev_mvit_base, "
                             "mvit_base, rev_vit_base_patch16_224")
        body = timm.create_model(backbone, **{"dynamic_img_size": True, "num_classes": 0, **backbone_kwargs})
    else:
        if backbone_kwargs:
            raise TypeError(f"backbone kwargs {sorted(backbone_kwargs)} apply to a backbone given by name only")
        body = backbone
    if pretrained is not None:
        load_backbone_weights(body, pretrained)
    body.reset_classifier(0)
    name, kwargs = model_spec(body)
    if isinstance(min_size, Sequence) and not isinstance(min_size, str):
        min_size = tuple(int(s) for s in min_size)
    heads = dict(box_head=TwoMLPHead(out_channels * 7 * 7, box_head_dim),  # torchvision's heads, widths given
                 box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
                 mask_head=MaskRCNNHeads(out_channels, (mask_head_dim,) * 4, 1),
                 mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes))
    det = MaskRCNN(build_backbone(body, out_channels), num_classes=None, min_size=min_size, max_size=max_size,
                   rpn_anchor_generator=_anchor_generator(anchor_sizes), **heads, **dict(detector_kwargs or {}))
    det.revvit_options = {
        "backbone": name, "backbone_kwargs": kwargs, "num_classes": int(num_classes),
        "min_size": list(min_size) if isinstance(min_size, tuple) else int(min_size), "max_size": int(max_size),
        "out_channels": int(out_channels), "anchor_sizes": None if anchor_sizes is None else list(anchor_sizes),
        "box_head_dim": int(box_head_dim), "mask_head_dim": int(mask_head_dim),
        "detector_kwargs": dict(detector_kwargs or {}),
    }
    return set_backprop(det, backprop)  # MViT has no reversible parts: left as it is


# -- pretrained classification weights --------------------------------------------------------------

def _pos_grids(model: nn.Module, key: str) -> tuple:
    """The token grid `model`'s position embedding `key` is made for."""
    if hasattr(model, "specs"):  # RevMViT / MViT: (T, H, W)
        t, h, w = model.specs[0].grid
        return {"pos_embed": (t, h, w), "pos_embed_spatial": (h, w), "pos_embed_temporal": (t, 1, 1)}[key]
    return tuple(model.patch_embed.grid_size)


def load_backbone_weights(model: nn.Module, path: str | os.PathLike, warn: bool = True) -> dict[str, list[str]]:
    """Load a classification checkpoint (official .pyth or revvit .safetensors, any input size) into the revvit
    model `model`: the classifier (`head.*`) is dropped, position embeddings are resampled to `model`'s grid.

    Returns {"loaded", "resized", "dropped", "missing" (model weights the file lacks), "unused" (file weights
    with no place)}; missing and unused ones are named in a warning (`warn`). A weight whose shape does not
    fit, or a file with nothing that fits, raises CheckpointError: it is another architecture."""
    path = os.fspath(path)
    source = load_weights(path)  # builds the classification model the file describes
    if type(source) is not type(model):
        raise CheckpointError(path, f"a {type(source).__name__} checkpoint cannot initialise a {type(model).__name__} "
                                    "backbone", "Choose the backbone of the checkpoint's family.")
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "resized": [], "dropped": [], "missing": [], "unused": []}
    mapped: dict[str, Tensor] = {}
    wrong = []
    for key, value in source.state_dict().items():
        if key.startswith("head."):
            report["dropped"].append(key)
        elif key not in own:
            report["unused"].append(key)
        else:
            if key.startswith("pos_embed") and value.shape != own[key].shape:
                value = resample_pos_embed(value, _pos_grids(source, key), _pos_grids(model, key))
                report["resized"].append(key)
            if value.shape != own[key].shape:
                wrong.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            else:
                mapped[key] = value
    if wrong or not mapped:
        problem = f"shape mismatches: {', '.join(wrong[:8])}" if wrong else "no weight fits the backbone"
        raise CheckpointError(path, f"cannot initialise the backbone: {problem}",
                              "The checkpoint is another architecture; give the backbone it was trained as.")
    report["missing"] = sorted(k for k in own if k not in mapped and not k.startswith("head."))
    model.load_state_dict(mapped, strict=False)
    report["loaded"], report["dropped"], report["unused"] = sorted(mapped), sorted(report["dropped"]), \
        sorted(report["unused"])
    if warn and (report["missing"] or report["unused"]):
        warnings.warn(f"{os.path.basename(path)}: backbone weights not in the checkpoint (left as initialised): "
                      f"{report['missing'] or 'none'}; checkpoint weights with no place: {report['unused'] or 'none'}",
                      stacklevel=2)
    return report


# -- the detector's own file -------------------------------------------------------------------------

def detector_options(det: nn.Module) -> dict:
    """The `create_detector` options that rebuild `det` (without pretrained weights)."""
    options = getattr(det, "revvit_options", None)
    if options is None:
        raise TypeError("not a detector made by revvit.detection.create_detector")
    return copy.deepcopy(options)


def save_detector(det: nn.Module, path: str | os.PathLike, extra_metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Write the detector's weights and its options (metadata "detector") to a .safetensors file, atomically."""
    options = detector_options(det)
    save(det, path, {"task": TASK, "detector": options, **(extra_metadata or {})},
         model_name=f"maskrcnn/{options['backbone']}", model_kwargs=options["backbone_kwargs"])


def build_detector(options: Mapping[str, Any]) -> MaskRCNN:
    """A detector from `detector_options` (fresh weights)."""
    options = dict(options)
    kwargs = {k: _tuplify(v) for k, v in options.pop("backbone_kwargs").items()}
    body = timm.create_model(options.pop("backbone"), **kwargs)
    return create_detector(body, **options)


def _tuplify(value: Any) -> Any:
    """JSON lists back to the tuples the model configs use."""
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def load_detector(path: str | os.PathLike) -> tuple[MaskRCNN, dict]:
    """(detector in eval mode, file metadata) from a file `save_detector` (or `revvit detect train`) wrote."""
    path = os.fspath(path)
    meta = read_metadata(path)
    if meta.get("task") != TASK or "detector" not in meta:
        raise CheckpointError(path, "not a detector weights file (no 'detector' metadata)",
                              "Give the model.safetensors of `revvit detect train`; classifiers: `revvit eval`.")
    try:
        det = build_detector(meta["detector"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(path, f"cannot build the detector its metadata describes ({e})") from None
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"cannot read the tensors ({type(e).__name__}: {e})") from None
    result = det.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(path, f"weights do not fit the detector: missing {result.missing_keys[:8]}, "
                                    f"unexpected {result.unexpected_keys[:8]}")
    return det.eval(), meta


def detector_from_checkpoint(path: str | os.PathLike) -> tuple[MaskRCNN, dict]:
    """A detector from `model.safetensors` or a training checkpoint (`.pt`) of `revvit detect train`."""
    path = os.fspath(path)
    wanted = "Give the model.safetensors (or a checkpoints/ckpt_N.pt) of `revvit detect train`."
    if os.path.isdir(path):
        inside = os.path.join(path, "model.safetensors")
        raise CheckpointError(path, "is a folder, not a file", f"Give {inside}." if os.path.isfile(inside) else wanted)
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    if not path.endswith(".pt") and not saved_by_torch(path):
        return load_detector(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable or foreign file: one line naming it)
        raise CheckpointError(path, f"not a readable detection checkpoint ({type(e).__name__}: {e})") from None
    if not (isinstance(ckpt, dict) and "detector" in ckpt and "model" in ckpt):
        raise CheckpointError(path, "not a detector file: a PyTorch checkpoint without a detector (a classifier's, "
                                    "or official SlowFast weights)",
                              f"{wanted} Classifiers: `revvit eval`; as a backbone: `detect train --pretrained`.")
    try:
        det = build_detector(ckpt["detector"])
        det.load_state_dict(ckpt["model"])
    except Exception as e:  # noqa: BLE001  (a damaged or foreign checkpoint: one line naming it)
        raise CheckpointError(path, f"not a readable detection checkpoint ({type(e).__name__}: {e})") from None
    return det.eval(), {"detector": ckpt["detector"], "config": ckpt.get("config", {})}


