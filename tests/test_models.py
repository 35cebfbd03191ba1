"""Every revvit model has the same face (timm's), so property tests run over the whole registry: a model
is covered by registering it. Base sizes are shrunk (width, depth, input) to stay fast on a CPU."""
import os
import sys

import pytest
import timm
import torch

from revvit.models import MViT, RevMViT, RevViT

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_reversible_matches_autograd  # noqa: E402


def revvit_model_names() -> list[str]:
    """Every model revvit registers with timm (found by the module of its entrypoint)."""
    return sorted(n for n in timm.list_models()
                  if timm.models.model_entrypoint(n).__module__.startswith("revvit.models."))


NAMES = revvit_model_names()


def small(name: str, **kwargs):
    """`name` at a CPU size: the variant's own layout where it is cheap, fewer/narrower layers otherwise."""
    torch.manual_seed(0)
    if timm.models.model_entrypoint(name).__module__ == "revvit.models.vit":
        return timm.create_model(name, **{**dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2),
                                          **kwargs})
    model = timm.create_model(name, **{**dict(img_size=32, embed_dim=16), **kwargs})
    if model.cfg.num_frames > 4:  # a video variant: fewer frames
        torch.manual_seed(0)
        model = timm.create_model(name, **{**dict(img_size=32, embed_dim=16, num_frames=4), **kwargs})
    return model


def example_input(model, batch: int = 2):
    cfg = model.cfg
    frames = getattr(cfg, "num_frames", 1)
    shape = (batch, cfg.in_chans) + ((frames,) if frames > 1 else ()) + (cfg.img_size, cfg.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=NAMES)
def model_and_input(request):
    model = small(request.param, num_classes=7).eval()
    return model, example_input(model)


def test_registry_holds_every_family():
    assert len(NAMES) >= 12
    families = {type(small(n)) for n in ("rev_vit_tiny_patch16_224", "rev_mvit_tiny", "mvit_tiny")}
    assert families == {RevViT, RevMViT, MViT}


def test_forward_gives_finite_logits_per_class(model_and_input):
    model, x = model_and_input
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


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
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


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
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert cfg["first_conv"] + ".weight" in state  # as timm's own tests check
    assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
    assert cfg["classifier"] + ".weight" in state and state[cfg["classifier"] + ".weight"].shape[0] == 7


def test_every_parameter_gets_a_gradient(model_and_input):
    model, x = model_and_input
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_is_timms_switch(name):
    model = small(name)
    if isinstance(model, MViT):  # no reversible blocks: timm's activation checkpointing of each block
        model.set_grad_checkpointing()
        assert model.grad_checkpointing and model.backprop == "autograd"
        model.set_grad_checkpointing(False)
        assert not model.grad_checkpointing
        return
    model.set_grad_checkpointing(enable=False)
    assert model.backprop == "autograd"
    model.set_grad_checkpointing()  # timm's train.py --grad-checkpointing calls it so
    assert model.backprop == "reversible"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("mvit_tiny")])
def test_twin_grad_checkpointing_gives_the_same_gradients(name):
    model = small(name, drop_path_rate=0.3).double().train()
    x = example_input(model).double()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        model(x).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


REVERSIBLE = [
    ("rev_vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3)),
    ("rev_vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4)),
    ("rev_mvit_tiny", {}),
    ("rev_mvit_tiny", dict(stage_depths=(2, 2, 3))),
    ("rev_mvit_tiny_video", {}),
]


@pytest.mark.parametrize("name, kwargs", REVERSIBLE, ids=[f"{n}-{sorted(k.items())}" for n, k in REVERSIBLE])
def test_fp32_reversible_gradients_match_autograd_with_drop_path(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.3, **kwargs)
    assert_reversible_matches_autograd(model, example_input(model), loss=lambda out: out.logsumexp(-1).sum(),
                                       seed=4, rtol=1e-5)


# -- any input size (dynamic_img_size) --------------------------------------------------------------

DYNAMIC = {  # name -> (CPU-sized kwargs, total stride)
    "rev_vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2), 8),
    "rev_mvit_tiny": (dict(img_size=32, embed_dim=16), 16),
    "mvit_tiny": (dict(img_size=32, embed_dim=16), 16),
}


def dynamic(name: str, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**DYNAMIC[name][0], "num_classes": 5, "dynamic_img_size": True, **kwargs})


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_img_size_is_identical_at_the_built_size_and_follows_other_sizes(name):
    kwargs, stride = DYNAMIC[name]
    fixed = dynamic(name, dynamic_img_size=False).eval()
    model = dynamic(name).eval()
    model.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), fixed(x))
    x = torch.randn(2, 3, 3 * stride, 5 * stride)
    assert model(x).shape == (2, 5) and torch.isfinite(model(x)).all()
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(model.feature_info)
    for info, m in zip(model.feature_info, maps):
        r = info["reduction"]
        assert m.shape == (2, info["num_chs"], 3 * stride // r, 5 * stride // r)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, stride + stride // 2, stride))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):  # the fixed model says how to take any size
        fixed(x)


@pytest.mark.parametrize("name", ["rev_vit_tiny_patch16_224", "rev_mvit_tiny"])
def test_reversible_gradients_equal_autograd_at_another_size(name):
    stride = DYNAMIC[name][1]
    model = dynamic(name, drop_path_rate=0.2).double()
    x = torch.randn(2, 3, 2 * stride, 3 * stride, dtype=torch.float64)
    assert_reversible_matches_autograd(model, x)


def test_two_forwards_of_different_grids_before_one_backward():
    """32x64 and 64x32 have the same token count but not the same grid: each recomputation must pool on its
    own forward's grid, whatever ran in between."""
    model = dynamic("rev_mvit_tiny", drop_path_rate=0.2).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_reversible_matches_autograd(model, x, forward=lambda m, v: torch.cat([m(v[..., :32, :]), m(v[..., :, :32])]))


def test_dynamic_video_model_takes_other_clip_sizes():
    torch.manual_seed(0)
    model = timm.create_model("rev_mvit_tiny_video", img_size=32, embed_dim=16, num_frames=4, num_classes=3,
                              dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 8, 48, 32)).shape == (1, 3)


def test_initialisation_does_not_depend_on_python_hashing():
    # A process's string hashing (PYTHONHASHSEED) is random: with a seed set, every model must start from
    # the same weights in every process (torchrun ranks, a resumed run), so nothing iterates a set in init.
    import subprocess

    code = ("import sys, hashlib; sys.path.insert(0, 'tests'); from test_models import NAMES, small\n"
            "for n in NAMES:\n"
            "    h = hashlib.sha256()\n"
            "    for k, v in small(n).state_dict().items(): h.update(k.encode() + v.numpy().tobytes())\n"
            "    print(n, h.hexdigest())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "4")]
    assert runs[0].count("\n") == len(NAMES) and runs[0] == runs[1]


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("rev_")])
def test_a_hook_that_skips_recomputations_sees_each_module_as_often_as_in_autograd_mode(name):
    from revvit.reversible import recomputing

    model = small(name, drop_path_rate=0.2)
    x = example_input(model)
    calls, recomputed = {}, []

    def count(module, args, out):
        if recomputing():
            recomputed.append(module)
        else:
            calls[(model.backprop, id(module))] = calls.get((model.backprop, id(module)), 0) + 1

    for module in model.modules():
        if not list(module.children()):  # every leaf layer, inside F, G and the stage transitions alike
            module.register_forward_hook(count)
    for mode in ("reversible", "autograd"):
        model.set_backprop(mode)
        model(x).logsumexp(-1).sum().backward()
    per_mode = {mode: {k[1]: v for k, v in calls.items() if k[0] == mode} for mode in ("reversible", "autograd")}
    assert per_mode["reversible"] == per_mode["autograd"]
    assert recomputed  # the hooks did run in the recomputations too
