"""Mask R-CNN on revvit backbones: the torchvision seam (maps, strides, channels), reversible backprop through
the whole detector, any input size, pretrained classification weights, the detector's own file."""
import os
import sys

import pytest
import torch
from torch import nn

import revvit
from revvit.detection import create_detector, load_backbone_weights, load_detector, save_detector
from revvit.detection.backbone import LEVELS
from revvit.io import CheckpointError
from revvit.models import RevMViT, RevViT

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_reversible_matches_autograd  # noqa: E402
from official_format import write_pyth  # noqa: E402

# CPU-sized backbones: 4 stages (strides 4-32) for the multiscale family; patch 16 for the simple pyramid
TINY = {
    "rev_mvit_tiny": dict(stage_depths=(1, 2, 2, 2), embed_dim=16),
    "mvit_tiny": dict(stage_depths=(1, 2, 2, 2), embed_dim=16),
    "rev_vit_tiny_patch16_224": dict(depth=3, embed_dim=32, num_heads=2),
}
SMALL_HEADS = dict(min_size=64, max_size=96, out_channels=16, anchor_sizes=(8, 16, 32, 64, 128), box_head_dim=32,
                   mask_head_dim=8)


def tiny_detector(name: str, num_classes: int = 4, **kwargs):
    torch.manual_seed(0)
    return create_detector(name, num_classes, **{**SMALL_HEADS, **TINY[name], **kwargs})


def targets(sizes, dtype=torch.float32):
    out = []
    for i, (h, w) in enumerate(sizes):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 4:20, 6:30] = 1
        masks[1, h // 2:h - 2, w // 3:w - 4] = 1
        boxes = torch.tensor([[6, 4, 30, 20], [w // 3, h // 2, w - 4, h - 2]], dtype=dtype)
        out.append({"boxes": boxes, "labels": torch.tensor([1, 2 + i % 2]), "masks": masks})
    return out


@pytest.mark.parametrize("name", TINY)
def test_backbone_returns_five_levels_at_strides_4_to_64(name):
    det = tiny_detector(name).eval()
    feats = det.backbone(torch.randn(2, 3, 64, 96))
    assert list(feats) == list(LEVELS) and det.backbone.out_channels == 16
    for level, stride in zip(LEVELS, (4, 8, 16, 32, 64)):
        assert feats[level].shape == (2, 16, -(-64 // stride), -(-96 // stride)), level


@pytest.mark.parametrize("name", TINY)
def test_detector_trains_and_predicts_on_images_of_different_sizes(name):
    det = tiny_detector(name)
    sizes = [(64, 80), (72, 56)]
    losses = det.train()([torch.rand(3, h, w) for h, w in sizes], targets(sizes))
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in det.backbone.body.parameters() if p.requires_grad)
    out = det.eval()([torch.rand(3, h, w) for h, w in sizes])
    assert [o["masks"].shape[-2:] for o in out] == [torch.Size(s) for s in sizes]


class _Whole(nn.Module):
    """The detector seen by assert_reversible_matches_autograd: set_backprop on every reversible model inside."""

    def __init__(self, det):
        super().__init__()
        self.det = det

    def set_backprop(self, mode):
        revvit.set_backprop(self.det, mode)
        return self

    @property
    def backprop(self):
        return next(m.backprop for m in self.det.modules() if isinstance(m, (RevViT, RevMViT)))


@pytest.mark.parametrize("name", ["rev_mvit_tiny", "rev_vit_tiny_patch16_224"])
def test_whole_detector_gradients_with_reversible_backprop_equal_autograd(name):
    """fp64, drop path on: every parameter of the detector (backbone, pyramid, RPN, heads) and the images."""
    det = tiny_detector(name, drop_path_rate=0.3).double()
    sizes = [(64, 64), (64, 64)]
    tgt = targets(sizes, torch.float64)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    assert_reversible_matches_autograd(_Whole(det), x, forward=lambda m, v: m.det(list(v), tgt),
                                       loss=lambda losses: sum(losses.values()))


def test_set_backprop_reaches_every_reversible_model_inside_and_returns_the_module():
    det = tiny_detector("rev_mvit_tiny")
    assert revvit.set_backprop(det, "autograd") is det
    assert det.backbone.body.backprop == "autograd"
    assert all(not s.recompute for s in det.backbone.body.stages if hasattr(s, "recompute"))
    revvit.set_backprop(det, "reversible")
    assert det.backbone.body.backprop == "reversible"
    revvit.set_backprop(tiny_detector("mvit_tiny"), "reversible")  # nothing reversible: left alone
    with pytest.raises(ValueError, match="backprop mode must be one of"):
        revvit.set_backprop(det, "fast")


def test_backbone_needs_four_stages_and_a_stride_16_vit():
    with pytest.raises(ValueError, match="4 stages at strides 4, 8, 16, 32"):
        create_detector("rev_mvit_tiny", 3, embed_dim=16)  # 3 stages
    with pytest.raises(ValueError, match="patch_size=16"):
        create_detector("rev_vit_tiny_patch16_224", 3, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_detector("resnet_what", 3)


# -- pretrained classification weights ---------------------------------------------------------------

def _classifier(cls, **kw):
    torch.manual_seed(1)
    return cls(**kw).eval()


def test_official_rev_mvit_checkpoint_initialises_the_backbone_pos_embed_resized(tmp_path):
    kw = dict(img_size=32, num_classes=7, **TINY["rev_mvit_tiny"])
    source = _classifier(RevMViT, **kw)
    path = write_pyth(tmp_path / "REV_MVIT.pyth", source)
    det = create_detector("rev_mvit_tiny", 3, pretrained=path, img_size=64, **{**SMALL_HEADS, **TINY["rev_mvit_tiny"]})
    body = det.backbone.body
    assert body.pos_embed.shape == (1, 16 * 16, 16)  # 64 px: 16x16 tokens, from the 8x8 of the checkpoint
    got, want = body.state_dict(), source.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if not k.startswith("pos_embed"))
    assert "norm.weight" not in got  # the final norm has no use in front of the FPN: pruned
    report = load_backbone_weights(RevMViT(**{**kw, "img_size": 64, "num_classes": 0}), path)
    assert report["dropped"] == ["head.bias", "head.weight"] and report["resized"] == ["pos_embed"]
    assert report["missing"] == [] and report["unused"] == []


def test_revvit_weights_file_initialises_a_vit_backbone(tmp_path):
    source = _classifier(RevViT, img_size=32, patch_size=16, num_classes=5, **TINY["rev_vit_tiny_patch16_224"])
    path = tmp_path / "vit.safetensors"
    revvit.save(source, path, model_name="rev_vit_tiny_patch16_224")
    det = tiny_detector("rev_vit_tiny_patch16_224", pretrained=path)
    body = det.backbone.body
    assert torch.equal(body.stack.blocks[2].f.attn.q.weight, source.stack.blocks[2].f.attn.q.weight)
    assert body.pos_embed.shape == (1, 14 * 14, 32)  # resized from 2x2 to the 224 grid the backbone was built at


def test_a_checkpoint_of_another_family_or_shape_is_refused_by_name(tmp_path):
    source = _classifier(RevViT, img_size=32, patch_size=16, num_classes=5, depth=1, embed_dim=32, num_heads=2)
    path = tmp_path / "vit.safetensors"
    revvit.save(source, path, model_name="rev_vit_tiny_patch16_224")
    with pytest.raises(CheckpointError, match="RevViT checkpoint cannot initialise a RevMViT"):
        create_detector("rev_mvit_tiny", 3, pretrained=path, **TINY["rev_mvit_tiny"])
    with pytest.raises(CheckpointError, match="shape mismatches: .*stack.blocks.0"):
        create_detector("rev_vit_tiny_patch16_224", 3, pretrained=path, depth=1, embed_dim=64, num_heads=2)


def test_missing_backbone_weights_are_reported_by_name(tmp_path):
    source = _classifier(RevViT, img_size=32, patch_size=16, num_classes=5, depth=1, embed_dim=32, num_heads=2)
    path = tmp_path / "vit.safetensors"
    revvit.save(source, path, model_name="rev_vit_tiny_patch16_224")
    with pytest.warns(UserWarning, match=r"not in the checkpoint .*stack\.blocks\.1\."):
        create_detector("rev_vit_tiny_patch16_224", 3, pretrained=path, depth=2, embed_dim=32, num_heads=2)


def test_detector_file_round_trips_with_its_options(tmp_path):
    det = tiny_detector("rev_mvit_tiny").eval()
    save_detector(det, tmp_path / "det.safetensors", {"note": "x"})
    again, meta = load_detector(tmp_path / "det.safetensors")
    assert meta["detector"]["backbone"] == "rev_mvit_tiny" and meta["note"] == "x"
    x = [torch.rand(3, 64, 64)]
    assert torch.equal(again.backbone(x[0][None])["0"], det.backbone(x[0][None])["0"])
    with pytest.raises(CheckpointError, match="not a detector weights file"):
        revvit.save(_classifier(RevViT, img_size=32, patch_size=16, depth=1, embed_dim=32, num_heads=2),
                    tmp_path / "c.safetensors", model_name="rev_vit_tiny_patch16_224")
        load_detector(tmp_path / "c.safetensors")
