"""Model options are checked when the config is made: an invalid value is refused with a ValueError that
names the option, the value and what is allowed, before any module is built; every valid value still builds."""
import math
import re

import pytest
import timm
import torch

from revvit.models import MViTConfig, RevViT, RevViTConfig
from revvit.train.config import TrainConfig
from revvit.train.parts import TrainError, create_run_model

VIT = "rev_vit_tiny_patch16_224"
MVIT = "rev_mvit_tiny"
SMALL_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def refused(name: str, option: str, value, allowed: str, **base):
    """Assert that timm.create_model(name, option=value) is refused, naming the option, value and range."""
    pattern = rf"{re.escape(option)} must be {re.escape(allowed)}, got {re.escape(repr(value))}"
    with pytest.raises(ValueError, match=pattern):
        timm.create_model(name, **{**base, option: value})


# -- sizes: integers >= 1 (not floats, strings or bools) ------------------------------------------------

@pytest.mark.parametrize("option", ["patch_size", "embed_dim", "depth", "num_heads", "in_chans", "img_size"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "abc", True])  # (timm drops a None: the default)
def test_rev_vit_size_that_is_not_a_positive_integer_is_refused(option, value):
    allowed = "an integer >= 1 or an (H, W) pair of them" if option in ("img_size", "patch_size") else "an integer >= 1"
    refused(VIT, option, value, allowed, **SMALL_VIT)


@pytest.mark.parametrize("option", ["embed_dim", "depth", "num_heads", "in_chans", "num_frames"])
@pytest.mark.parametrize("value", [0, -3, 1.5, "16", False])
def test_mvit_size_that_is_not_a_positive_integer_is_refused(option, value):
    refused(MVIT, option, value, "an integer >= 1")


@pytest.mark.parametrize("value", [(32,), (32, 0), (32, 32, 32), (32.0, 32.0)])
def test_img_size_pair_that_is_not_two_positive_integers_is_refused(value):
    refused(VIT, "img_size", value, "an integer >= 1 or an (H, W) pair of them", **SMALL_VIT)


def test_patch_size_zero_is_refused_before_any_division():
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1 .*got 0"):
        timm.create_model("rev_vit_small_patch16_224", patch_size=0)


def test_embed_dim_that_the_heads_do_not_divide_is_refused_naming_both():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads, got embed_dim=30 and num_heads=4"):
        timm.create_model(VIT, **{**SMALL_VIT, "embed_dim": 30, "num_heads": 4})


# -- mlp_ratio, rates, classes, flags, pooling ------------------------------------------------------------

@pytest.mark.parametrize("name", [VIT, MVIT])
@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, "4", True])
def test_mlp_ratio_that_is_not_a_finite_positive_number_is_refused(name, value):
    refused(name, "mlp_ratio", value, "a finite number > 0", **(SMALL_VIT if name == VIT else {}))


def test_mlp_ratio_that_leaves_no_hidden_unit_is_refused():
    with pytest.raises(ValueError, match=r"mlp_ratio must leave the MLP a hidden unit .*0.01 with embed_dim=32"):
        timm.create_model(VIT, **SMALL_VIT, mlp_ratio=0.01)


@pytest.mark.parametrize("name", [VIT, MVIT])
@pytest.mark.parametrize("option", ["drop_path_rate", "drop_rate"])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, "0.1"])
def test_rate_outside_zero_to_one_is_refused(name, option, value):
    refused(name, option, value, "a number in [0, 1)", **(SMALL_VIT if name == VIT else {}))


@pytest.mark.parametrize("name", [VIT, MVIT])
@pytest.mark.parametrize("value", [-1, 2.0, "10"])
def test_num_classes_below_zero_or_not_an_integer_is_refused(name, value):
    refused(name, "num_classes", value, "an integer >= 0", **(SMALL_VIT if name == VIT else {}))


@pytest.mark.parametrize("name", [VIT, MVIT])
@pytest.mark.parametrize("option", ["qkv_bias", "dynamic_img_size"])
def test_flag_that_is_not_a_bool_is_refused(name, option):
    refused(name, option, "false", "True or False", **(SMALL_VIT if name == VIT else {}))


@pytest.mark.parametrize("name", [VIT, MVIT])
def test_unknown_global_pool_is_refused(name):
    refused(name, "global_pool", "max", "'avg' or '' (no pooling)", **(SMALL_VIT if name == VIT else {}))


# -- MViT's layout options ------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value,message", [
    ("patch_kernel", (3, 7, 7), r"patch_kernel must be 2 integers >= 1, got \(3, 7, 7\); patch_2d=True takes \(h, w\)"),
    ("patch_stride", (0, 4), r"patch_stride must be 2 integers >= 1, got \(0, 4\)"),
    ("patch_padding", (-1, 3), r"patch_padding must be 2 integers >= 0, got \(-1, 3\)"),
    ("pool_kvq_kernel", (3, 3), r"pool_kvq_kernel \(t, h, w\) must be 3 integers >= 1, got \(3, 3\)"),
    ("pool_kv_stride_adaptive", (1, 0, 2), r"pool_kv_stride_adaptive \(t, h, w\) must be 3 integers >= 1"),
    ("dim_mul", ((1, 0.0), (3, 2.0)), r"multiplier of dim_mul entry \(1, 0.0\) must be a number > 0, got 0.0"),
    ("head_mul", ((1,), (3, 2.0)), r"head_mul entries must be \(layer, multiplier\), got \(1,\)"),
    ("pool_q_stride", ((1, 1, 0, 2), (3, 1, 2, 2)), r"strides of pool_q_stride entry \(1, 1, 0, 2\) must be 3"),
    ("pool_q_stride", ((-1, 1, 2, 2), (3, 1, 2, 2)), r"pool_q_stride layer index must be an integer >= 0, got -1"),
    ("transition_layers", 3, r"transition_layers must be layer indices, got 3"),
    ("stage_depths", (1, 0, 2), r"stage_depths entries must be an integer >= 1, got 0"),
    ("stage_depths", (), r"stage_depths must be a non-empty list of layer counts >= 1, got \(\)"),
    ("num_frames", 4.0, r"num_frames must be an integer >= 1, got 4.0"),
    ("patch_2d", "yes", r"patch_2d must be True or False, got 'yes'"),
])
def test_mvit_layout_option_of_the_wrong_form_is_refused_naming_it(option, value, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(MVIT, **{option: value})


# -- the config itself, and the training run's one-line error -------------------------------------------

def test_config_dataclasses_refuse_at_construction_without_building_a_model():
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        RevViTConfig(depth=0)
    with pytest.raises(ValueError, match="mlp_ratio must be a finite number > 0, got None"):
        RevViTConfig(mlp_ratio=None)
    with pytest.raises(ValueError, match="embed_dim must be an integer >= 1, got -8"):
        MViTConfig(embed_dim=-8)


def test_revvit_train_reports_a_bad_option_as_one_line_naming_it():
    cfg = TrainConfig(model=VIT, model_kwargs={"depth": 0})
    with pytest.raises(TrainError, match=f"cannot build {VIT}: depth must be an integer >= 1, got 0") as e:
        create_run_model(cfg, num_classes=3, img_size=32, in_chans=3)
    assert "\n" not in str(e.value)


# -- every valid value still builds -------------------------------------------------------------------

def test_num_classes_zero_builds_a_model_without_a_classifier():
    model = timm.create_model(VIT, **SMALL_VIT, num_classes=0)
    assert isinstance(model.head, torch.nn.Identity) and model(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    assert isinstance(timm.create_model(MVIT, num_classes=0).head, torch.nn.Identity)


def test_valid_edge_values_build():
    model = timm.create_model(VIT, **{**SMALL_VIT, "img_size": [32, 16], "depth": 1}, mlp_ratio=0.5,
                              drop_path_rate=0.0, qkv_bias=0)
    assert model.cfg.img_size == (32, 16) and model.cfg.qkv_bias is False and len(model.stack) == 1
    assert model(torch.randn(1, 3, 32, 16)).shape == (1, 1000)
    mvit = timm.create_model(MVIT, patch_kernel=7, dim_mul=[[1, 2.0], [3, 2.0]], drop_rate=0.99)
    assert mvit.cfg.patch_kernel == (7, 7) and mvit.cfg.dim_mul == ((1, 2.0), (3, 2.0))


def test_numpy_style_integers_are_sizes():
    model = RevViT(**{**SMALL_VIT, "depth": torch.tensor(2).numpy()[()]})
    assert model.cfg.depth == 2 and type(model.cfg.depth) is int
