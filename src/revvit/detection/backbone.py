"""Backbones with torchvision's detection seam: `forward(images) -> OrderedDict` of maps "0".."3", "pool"
(strides 4, 8, 16, 32, 64) and `out_channels`, what `torchvision.models.detection.MaskRCNN` takes.

    MultiscaleBackbone(RevMViT or MViT)   the four stage outputs (Rev-MViT: its two streams concatenated,
                                          2C, as its transitions fuse them) -> LayerNorm per stage ->
                                          torchvision FeaturePyramidNetwork + LastLevelMaxPool
    SimpleFeaturePyramid(RevViT)          ViTDet's simple pyramid from the one stride-16 map

Both take the features with the model's `forward_intermediates`, which runs the reversible stack as
segments ending at the taps: reversible backprop keeps only the tapped maps (returned anyway), and the
gradient the pyramid sends into each tap is added to what that segment's output receives.
"""
from __future__ import annotations

from collections import OrderedDict

from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..models import MViT, RevMViT, RevViT

__all__ = ["MultiscaleBackbone", "SimpleFeaturePyramid", "build_backbone", "LEVELS"]

LEVELS = ("0", "1", "2", "3", "pool")  # the names MaskRCNN's default poolers read ("pool" only by the RPN)


def _needs_dynamic(model: nn.Module) -> None:
    if not getattr(model.cfg, "dynamic_img_size", False):
        raise ValueError(f"a detection backbone takes images of any size: create the {type(model).__name__} with "
                         "dynamic_img_size=True")


class MultiscaleBackbone(nn.Module):
    """Rev-MViT / MViT stage outputs -> FPN. The model must have 4 stages (strides 4, 8, 16, 32).

    Each stage map gets a LayerNorm over channels before the FPN, as Detectron2's MViTv2 backbone gives each
    of its outputs (`scale{i}_norm`)."""

    def __init__(self, model: nn.Module, out_channels: int = 256):
        super().__init__()
        if not isinstance(model, (RevMViT, MViT)):
            raise TypeError(f"MultiscaleBackbone takes a RevMViT or MViT, got {type(model).__name__}")
        _needs_dynamic(model)
        strides = [f["reduction"] for f in model.feature_info]
        if strides != [4, 8, 16, 32]:
            raise ValueError(f"a Mask R-CNN backbone needs 4 stages at strides 4, 8, 16, 32; this model's stages are "
                             f"at strides {strides} (e.g. give stage_depths with 4 entries)")
        model.prune_intermediate_layers(prune_norm=True)  # classifier and final norm: no use here (no gradient)
        self.body = model
        channels = [f["num_chs"] for f in model.feature_info]
        self.norms = nn.ModuleList([LayerNorm2d(c) for c in channels])
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body.forward_intermediates(x, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), norm(m)) for i, (norm, m) in enumerate(zip(self.norms, maps))))


def _conv_norm(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022; Detectron2 `SimpleFeaturePyramid`) on Rev-ViT.

    The last block's [Y1, Y2] (stride 16, 2D channels) after the model's final norm is turned into
        stride 4:  ConvT(2x2, /2) -> LN -> GELU -> ConvT(2x2, /2)      (channels 2D/4)
        stride 8:  ConvT(2x2, /2)                                      (2D/2)
        stride 16: identity                                            (2D)
        stride 32: MaxPool(2)                                          (2D)
    each then Conv1x1 -> LN -> Conv3x3 -> LN to `out_channels`, plus a max-pool top level ("pool", stride 64).
    LN is LayerNorm over channels, as ViTDet's `norm="LN"`."""

    def __init__(self, model: nn.Module, out_channels: int = 256):
        super().__init__()
        if not isinstance(model, RevViT):
            raise TypeError(f"SimpleFeaturePyramid takes a RevViT, got {type(model).__name__}")
        _needs_dynamic(model)
        if model.cfg.patch_size != 16:
            raise ValueError(f"the simple pyramid builds strides 4-32 from a stride-16 map; this Rev-ViT has patch "
                             f"size {model.cfg.patch_size}: create it with patch_size=16")
        model.reset_classifier(0)
        self.body = model
        dim = model.num_features
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)),
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, 2),
        ])
        self.outputs = nn.ModuleList([
            nn.Sequential(_conv_norm(c, out_channels, 1), _conv_norm(out_channels, out_channels, 3))
            for c in (dim // 4, dim // 2, dim, dim)
        ])
        self.top = LastLevelMaxPool()
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        (y,) = self.body.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        maps = [out(scale(y)) for scale, out in zip(self.scales, self.outputs)]
        maps, names = self.top(maps, [], list(LEVELS[:4]))
        return OrderedDict(zip(names, maps))


def build_backbone(model: nn.Module, out_channels: int = 256) -> nn.Module:
    """The pyramid for a revvit model: FPN over stages (RevMViT, MViT) or the simple pyramid (RevViT)."""
    if isinstance(model, RevViT):
        return SimpleFeaturePyramid(model, out_channels)
    return MultiscaleBackbone(model, out_channels)
