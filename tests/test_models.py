"""Every revvit model has the same face (timm's), so one parametrised test checks all families."""
import pytest
import timm
import torch

import revvit  # noqa: F401

IMAGE, VIDEO = (2, 3, 32, 32), (2, 3, 4, 32, 32)
MODELS = [
    ("rev_vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), IMAGE),
    ("rev_mvit_tiny", {}, IMAGE),
    ("mvit_tiny", {}, IMAGE),
    ("rev_mvit_tiny_video", {}, VIDEO),
    ("mvit_tiny_video", {}, VIDEO),
]


@pytest.fixture(params=MODELS, ids=[m[0] for m in MODELS])
def model_and_input(request):
    name, kwargs, shape = request.param
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **kwargs).eval(), torch.randn(*shape)


def test_forward_gives_logits_per_class(model_and_input):
    model, x = model_and_input
    assert model(x).shape == (2, 7)


def test_features_then_head_is_forward(model_and_input):
    model, x = model_and_input
    feats = model.forward_features(x)
    assert feats.shape[0] == 2 and feats.shape[-1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)


def test_reset_classifier(model_and_input):
    model, x = model_and_input
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3


def test_no_weight_decay_names_real_parameters(model_and_input):
    model, _ = model_and_input
    names = dict(model.named_parameters())
    assert model.no_weight_decay() and all(n in names for n in model.no_weight_decay())


def test_intermediates_match_feature_info(model_and_input):
    model, x = model_and_input
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in model.feature_info]


def test_pretrained_cfg_describes_the_input(model_and_input):
    model, _ = model_and_input
    cfg = model.pretrained_cfg
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == 3 and cfg["classifier"] == "head"


REVERSIBLE = [
    ("rev_vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3), IMAGE),
    ("rev_vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4), IMAGE),
    ("rev_mvit_tiny", {}, IMAGE),
    ("rev_mvit_tiny", dict(stage_depths=(2, 2, 3)), IMAGE),
    ("rev_mvit_tiny_video", {}, VIDEO),
]


@pytest.mark.parametrize("name, kwargs, shape", REVERSIBLE,
                         ids=[f"{n}-{sorted(k.items())}" for n, k, _ in REVERSIBLE])
def test_fp32_reversible_gradients_match_autograd_with_drop_path(name, kwargs, shape):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.3, **kwargs)
    x = torch.randn(*shape, requires_grad=True)
    grads = {}
    for mode in ("reversible", "autograd"):
        model.set_backprop(mode)
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(4)
        model(x).logsumexp(-1).sum().backward()
        grads[mode] = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])
    err = (grads["reversible"] - grads["autograd"]).norm() / grads["autograd"].norm()
    assert err < 1e-5
