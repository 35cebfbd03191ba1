"""Rev-ViT: timm creation, the paper's sizes, the timm model interface, equivalence, input checks."""
import pytest
import timm
import torch

import revvit
from revvit.bench import measure_training_memory

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
    assert {"rev_vit_tiny_patch16_224", "rev_vit_small_patch16_224", "rev_vit_base_patch16_224",
            "rev_vit_large_patch16_224"} <= set(names)
    assert "vit_small_patch16_224" in timm.list_models("vit_small_patch16_224")  # timm's own is intact


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
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    grads = {}
    for mode in ("reversible", "autograd"):
        model.set_backprop(mode)
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(11)
        model(x).logsumexp(-1).sum().backward()
        grads[mode] = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])
    err = (grads["reversible"] - grads["autograd"]).norm() / grads["autograd"].norm()
    assert err < 1e-10


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
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = {}
    for mode in ("reversible", "autograd"):
        model.set_backprop(mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        final, maps = model.forward_intermediates(x, indices=[0, 2])
        (final.square().sum() + sum(m.sin().sum() for m in maps)).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads["reversible"].numel() == grads["autograd"].numel() > 0
    assert ((grads["reversible"] - grads["autograd"]).norm() / grads["autograd"].norm()) < 1e-10


def test_features_only_through_timm():
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_tiny_patch16_224", features_only=True, out_indices=(1, 3), depth=4,
                              img_size=32, patch_size=8)
    assert [f.shape for f in model(torch.randn(2, 3, 32, 32))] == [(2, 384, 4, 4)] * 2
    assert model.feature_info.channels() == [384, 384]
