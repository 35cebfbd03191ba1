"""Rev-ViT: timm creation, the paper's sizes, the timm model interface, equivalence, input checks."""
import os
import sys

import pytest
import timm
import torch

import revvit
from revvit.bench import measure_training_memory
from revvit.models.vit import checkpoint_filter_fn

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_reversible_matches_autograd  # noqa: E402
from official_format import official_state_dict  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, num_classes=5)


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("rev_vit_tiny_patch16_224", **{**SMALL, **kwargs})


def n_params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("name, millions", [
    ("rev_vit_tiny_patch16_224", 5.91),  # no paper figure: D 192, 12 blocks, 3 heads
    ("rev_vit_small_patch16_224", 22.4),
    ("rev_vit_base_patch16_224", 87.3),
])
def test_parameter_counts_match_the_paper_sizes(name, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert n_params(model) == pytest.approx(millions, abs=0.05)


def test_large_has_24_blocks_and_305m_parameters():
    with torch.device("meta"):
        model = timm.create_model("rev_vit_large_patch16_224")
    assert len(model.stack) == 24
    assert n_params(model) == pytest.approx(305.4, abs=0.1)


def test_registered_in_timm_without_shadowing_timm_names():
    names = timm.list_models("rev_vit_*")
    ours = {"rev_vit_tiny_patch16_224", "rev_vit_small_patch16_224", "rev_vit_base_patch16_224",
            "rev_vit_large_patch16_224"}
    assert ours <= set(names)
    assert {timm.models.model_entrypoint(n).__module__ for n in ours} == {"revvit.models.vit"}
    # timm's own ViT is intact: still timm's function, not replaced by a revvit one
    assert timm.models.model_entrypoint("vit_small_patch16_224").__module__ == "timm.models.vision_transformer"


def test_create_model_options_reach_the_model():
    model = tiny(in_chans=1, depth=3, drop_path_rate=0.2)
    assert len(model.stack) == 3
    assert model.patch_embed.proj.in_channels == 1
    assert model.stack.blocks[-1].drop_path == pytest.approx(0.2)
    assert model.stack.blocks[0].drop_path == 0.0
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_timm_interface():
    model = tiny(depth=2)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, model.num_features) and model.num_features == 2 * 192
    assert model.forward_head(feats, pre_logits=True).shape == (2, 384)
    assert model.forward_head(feats).shape == (2, 5)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert "pos_embed" in model.no_weight_decay()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.get_classifier() is model.head


def test_eval_returns_logits_not_probabilities():
    model = tiny(depth=2).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert not torch.allclose(out.softmax(-1), out)
    assert not torch.allclose(out.sum(-1), torch.ones(3))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_model_gradients_equal_autograd_in_fp64(depth):
    model = tiny(depth=depth, drop_path_rate=0.5).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert_reversible_matches_autograd(model, x, loss=lambda out: out.logsumexp(-1).sum(), seed=11, rtol=1e-10)


def test_reversible_memory_is_smaller_than_autograd():
    model = tiny(depth=6)
    x = torch.randn(4, 3, 32, 32)
    rev = measure_training_memory(model.set_backprop("reversible"), x).peak_bytes
    ag = measure_training_memory(model.set_backprop("autograd"), x).peak_bytes
    assert ag > 2 * rev


@pytest.mark.parametrize("shape, message", [
    ((2, 1, 32, 32), "expected 3 input channels"),
    ((2, 3, 64, 64), "expected images of size 32x32"),
    ((3, 32, 32), "expected an image batch"),
])
def test_bad_input_says_what_the_model_expects(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny(depth=1)(torch.randn(*shape))


def test_unknown_option_is_refused_by_name():
    with pytest.raises(TypeError, match="embed_dimm"):
        tiny(embed_dimm=12)


def test_package_exports():
    assert revvit.RevViT is type(tiny(depth=1))


def test_forward_intermediates_gives_block_maps_and_the_final_features():
    model = tiny(depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    final, maps = model.forward_intermediates(x, indices=[1, 3])
    assert [m.shape for m in maps] == [(2, 384, 4, 4)] * 2
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert torch.allclose(maps[1].flatten(2).transpose(1, 2), torch.cat(model.stack(*(2 * [
        model.patch_embed(x) + model.pos_embed])), -1), atol=1e-6)
    only = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC")
    assert [m.shape for m in only] == [(2, 16, 384)] * 2


def test_reversible_segments_give_the_same_gradients_as_autograd():
    model = tiny(depth=5, drop_path_rate=0.3).double()
    model.head.requires_grad_(False)  # forward_intermediates stops before the classifier
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_reversible_matches_autograd(
        model, x, forward=lambda m, v: m.forward_intermediates(v, indices=[0, 2]), seed=3, rtol=1e-10,
        loss=lambda out: out[0].square().sum() + sum(m.sin().sum() for m in out[1]))


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_checkpoint_filter_fn_maps_official_keys_onto_the_model(fused_qkv):
    source, model = tiny(depth=2), tiny(depth=2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    official = official_state_dict(source, fused_qkv=fused_qkv)
    assert any(k.startswith("rev_backbone.layers.1.F.attn.") for k in official)
    model.load_state_dict(checkpoint_filter_fn({"model_state": official}, model), strict=True)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    ours = source.state_dict()
    assert checkpoint_filter_fn(ours, model) is ours  # a state dict in our format passes through
    with pytest.raises(ValueError, match="no place in RevViT: .*rev_backbone.layers.1.F.attn.extra"):
        checkpoint_filter_fn({**official, "rev_backbone.layers.1.F.attn.extra.weight": torch.zeros(1)}, model)


def test_features_only_through_timm():
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_tiny_patch16_224", features_only=True, out_indices=(1, 3), depth=4,
                              img_size=32, patch_size=8)
    assert [f.shape for f in model(torch.randn(2, 3, 32, 32))] == [(2, 384, 4, 4)] * 2
    assert model.feature_info.channels() == [384, 384]
