"""Rev-MViT and its twin MViT: reversible gradients, the official layout, shapes, features, bad layouts."""
import math
import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import revvit  # noqa: F401  (registers the models)
from revvit.layers import PoolingAttention
from revvit.models.mvit import MViT, MViTConfig, RevMViT, StageTransition, checkpoint_filter_fn

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_reversible_matches_autograd  # noqa: E402

NAMES = ["rev_mvit_base", "rev_mvit_base_16x4", "mvit_base", "mvit_base_16x4",
         "rev_mvit_tiny", "mvit_tiny", "rev_mvit_tiny_video", "mvit_tiny_video"]
IMAGE, CLIP = (3, 3, 32, 32), (3, 3, 4, 32, 32)


# -- reversible backprop ----------------------------------------------------------------------------

@pytest.mark.parametrize("stage_depths", [(1, 2, 3), (2, 2, 4)], ids=["runs-1-1-2", "runs-2-1-3"])
@pytest.mark.parametrize("name,shape", [("rev_mvit_tiny", IMAGE), ("rev_mvit_tiny_video", CLIP)],
                         ids=["image", "video"])
def test_reversible_gradients_equal_autograd_fp64_with_drop_path(name, shape, stage_depths):
    torch.manual_seed(0)
    model = timm.create_model(name, stage_depths=stage_depths, drop_path_rate=0.5).double()
    transitions = [s for s in model.stages if isinstance(s, StageTransition)]
    assert len(transitions) == 2 and len(model.stages[-1]) >= 2
    x = torch.randn(shape, dtype=torch.float64)

    out_rev, out_ag = assert_reversible_matches_autograd(model, x, seed=1, rtol=1e-10)

    assert not torch.allclose(out_ag, model.eval()(x)), "drop path should be active in training"
    # the same draws; G's fused forward adds the MLP in blocks of hidden columns: equal up to rounding
    torch.testing.assert_close(out_rev, out_ag, rtol=1e-12, atol=0)


def test_reversible_mode_recomputes_transitions_and_keeps_less_memory():
    from revvit.bench import measure_training_memory
    torch.manual_seed(0)
    model = timm.create_model("rev_mvit_tiny")
    x = torch.randn(IMAGE)
    kept = measure_training_memory(model.set_backprop("autograd"), x).peak_bytes
    recomputed = measure_training_memory(model.set_backprop("reversible"), x).peak_bytes
    assert all(s.recompute for s in model.stages if isinstance(s, StageTransition))
    assert recomputed < 0.75 * kept


def test_transitions_recomputed_part_by_part_keep_less_memory_and_the_same_gradients():
    from revvit.bench import measure_training_memory
    torch.manual_seed(0)
    model = timm.create_model("rev_mvit_base", img_size=96, embed_dim=8, drop_path_rate=0.1).set_backprop("reversible")
    x = torch.randn(2, 3, 96, 96)
    whole = measure_training_memory(model.set_chunking(0), x).peak_bytes
    assert not any(s.nested for s in model.stages if isinstance(s, StageTransition))
    grads = []
    for chunking in (0, None):
        model.set_chunking(chunking).zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(x).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    parts = measure_training_memory(model.set_chunking(None), x).peak_bytes
    assert all(s.nested for s in model.stages if isinstance(s, StageTransition))
    assert parts < 0.7 * whole  # 0.6 at this size
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_eval_output_does_not_depend_on_backprop_mode():
    model = timm.create_model("rev_mvit_tiny_video").eval()
    x = torch.randn(CLIP)
    with torch.no_grad():
        a = model.set_backprop("reversible")(x)
        b = model.set_backprop("autograd")(x)
    assert torch.equal(a, b)


def test_twin_accepts_only_autograd_backprop():
    model = timm.create_model("mvit_tiny")
    assert model.set_backprop("autograd") is model and model.backprop == "autograd"
    with pytest.raises(ValueError, match="no reversible blocks"):
        model.set_backprop("reversible")


# -- the official layout ----------------------------------------------------------------------------

def test_param_counts_of_base_models():
    counts = {n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in
              ["rev_mvit_base", "rev_mvit_base_16x4"]}
    assert abs(counts["rev_mvit_base"] - 39.7e6) < 0.05e6
    # The release's checkpoint shapes (Conv3d (3,3,3) pooling, fused qkv, avg fusion) give 34.963M; the
    # model zoo's "34.9" is this number truncated, not rounded.
    assert abs(counts["rev_mvit_base_16x4"] - 34.963e6) < 0.01e6


def test_base_layout_matches_reference_table():
    model = timm.create_model("rev_mvit_base")
    specs = model.specs
    assert [s.index for s in specs if s.transition] == [1, 3, 14]
    assert [s.dim_out for s in specs] == [96] + [192] * 2 + [384] * 11 + [768] * 2
    assert [s.num_heads for s in specs] == [1] + [2] * 2 + [4] * 11 + [8] * 2
    assert [s.grid_out[1] for s in specs] == [56] + [28] * 2 + [14] * 11 + [7] * 2
    assert [s.stage for s in specs] == [0] + [1] * 2 + [2] * 11 + [3] * 2  # the feature levels
    assert [s.index for s in specs if s.stage_end] == [0, 2, 13, 15]
    assert [s.stride_kv[1] if s.stride_kv else 1 for s in specs] == [4] + [2] * 2 + [1] * 13
    assert all(s.kernel_kv == (1, 3, 3) for s in specs)  # K/V pooled even at stride 1
    layer1 = model.stages[1]
    assert layer1.fuse.mlp.fc1.weight.shape == (384, 192) and layer1.res_proj is None
    assert layer1.f.attn.pool_q.weight.shape == (96, 1, 1, 3, 3)
    assert model.norm.normalized_shape == (1536,) and model.head.in_features == 1536


def test_video_base_uses_avg_fusion_fused_qkv_and_separate_pos_embed():
    model = timm.create_model("rev_mvit_base_16x4")
    assert model.patch_embed.proj.weight.shape == (96, 3, 3, 7, 7)
    assert model.pos_embed_spatial.shape == (1, 3136, 96) and model.pos_embed_temporal.shape == (1, 8, 96)
    t = model.stages[1]
    assert t.fuse.mlp is None and t.res_proj.weight.shape == (192, 96)
    assert t.f.attn.qkv.bias is None and t.f.attn.qkv.weight.shape == (576, 96)
    assert t.f.attn.pool_k.weight.shape == (96, 1, 3, 3, 3)
    assert [s.stride_kv for s in model.specs][:4] == [(1, 8, 8), (1, 4, 4), (1, 4, 4), (1, 2, 2)]
    assert model.head.in_features == 1536 and model.head_drop.p == 0.5


def _official_keys(depth, transitions, separate_qkv, fusion):
    """The key names of an official SlowFast Rev-MViT state dict (REFERENCE.md section 4)."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "head.projection.weight", "head.projection.bias"]
    for i in range(depth):
        p = f"rev_backbone.layers.{i}."
        names = ["F.norm", "G.norm", "G.mlp.fc1", "G.mlp.fc2", "F.attn.proj", "F.attn.norm_k", "F.attn.norm_v"]
        if i in transitions:
            names += ["F.attn.norm_q"]
            names += ["pre_q_fuse.fuse_fn.fc1", "pre_q_fuse.fuse_fn.fc2"] if fusion != "avg" else ["res_proj"]
            keys.append(p + "F.attn.pool_q.weight")
        keys += [p + n + s for n in names for s in (".weight", ".bias")]
        keys += [p + "F.attn.pool_k.weight", p + "F.attn.pool_v.weight"]
        keys += [p + f"F.attn.{n}.{s}" for n in "qkv" for s in ("weight", "bias")] if separate_qkv else [
            p + "F.attn.qkv.weight"]
    return keys


@pytest.mark.parametrize("name", ["rev_mvit_base", "rev_mvit_base_16x4"])
def test_official_checkpoint_keys_map_onto_the_model(name):
    model = timm.create_model(name)
    video = name.endswith("16x4")
    keys = _official_keys(16, (1, 3, 14), separate_qkv=not video, fusion="avg" if video else "concat")
    keys += ["pos_embed_spatial", "pos_embed_temporal", "cls_token", "pos_embed_class"] if video else ["pos_embed"]
    ours = model.state_dict()
    ours_of = {official: key for key, official in checkpoint_filter_fn({k: k for k in keys}, model).items()}
    assert set(ours_of.values()) == set(ours)
    # a checkpoint with the official names (and the tensors' shapes) loads strictly, tensors in place
    official = {k: torch.randn(ours[ours_of[k]].shape) if k in ours_of else torch.zeros(1, 1, 96) for k in keys}
    model.load_state_dict(checkpoint_filter_fn({"model_state": official}, model), strict=True)
    assert all(torch.equal(model.state_dict()[ours_of[k]], v) for k, v in official.items() if k in ours_of)


# -- pooling attention and the transition -----------------------------------------------------------

def _reference_pool(x, conv, norm, grid):
    """(B, heads, N, hd): the official order, pooling each (sample, head) map with a depthwise conv."""
    b, h, n, d = x.shape
    y = x.reshape(b * h, *grid, d).permute(0, 4, 1, 2, 3).contiguous()
    y = F.conv3d(y, conv.weight, stride=conv.stride, padding=conv.padding, groups=d)
    return norm(y.reshape(b, h, d, -1).transpose(2, 3)), tuple(y.shape[2:])


def test_pooling_attention_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = PoolingAttention(16, 32, num_heads=2, kernel_q=(3, 3, 3), stride_q=(1, 2, 2),
                            kernel_kv=(3, 3, 3), stride_kv=(1, 2, 2)).double()
    x, grid = torch.randn(2, 2 * 6 * 6, 16, dtype=torch.float64), (2, 6, 6)
    out, grid_out = attn(x, grid)

    heads = lambda t: t.view(2, -1, 2, 16).permute(0, 2, 1, 3)  # noqa: E731
    q, _ = _reference_pool(heads(attn.q(x)), attn.pool_q, attn.norm_q, grid)
    k, _ = _reference_pool(heads(attn.k(x)), attn.pool_k, attn.norm_k, grid)
    v, _ = _reference_pool(heads(attn.v(x)), attn.pool_v, attn.norm_v, grid)
    a = ((q * 16 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(2, -1, 32))
    assert grid_out == (2, 3, 3) and out.shape == (2, 18, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_fused_qkv_is_q_k_v_stacked_along_the_output():
    torch.manual_seed(0)
    kw = dict(kernel_q=(1, 3, 3), stride_q=(1, 2, 2), kernel_kv=(1, 3, 3), stride_kv=(1, 1, 1))
    sep = PoolingAttention(8, 16, 2, qkv_bias=False, separate_qkv=True, **kw)
    fused = PoolingAttention(8, 16, 2, qkv_bias=False, separate_qkv=False, **kw)
    state = {k: v for k, v in sep.state_dict().items() if k[0] not in "qkv"}
    state["qkv.weight"] = torch.cat([sep.q.weight, sep.k.weight, sep.v.weight])
    fused.load_state_dict(state)
    x = torch.randn(2, 16, 8)
    torch.testing.assert_close(fused(x, (1, 4, 4))[0], sep(x, (1, 4, 4))[0])


def test_transition_pools_its_residual_with_the_attention_q_pooling():
    torch.manual_seed(0)
    model = timm.create_model("rev_mvit_tiny_video", drop_path_rate=0.0).eval()
    t = model.stages[1]
    x1, x2 = torch.randn(2, 2 * 8 * 8, 32), torch.randn(2, 2 * 8 * 8, 32)
    with torch.no_grad():
        fused = (x1 + x2) / 2
        res = t.f.attn.pool_like_q(t.res_proj(fused), t.f.grid)
        y = res + t.f(fused)
        torch.testing.assert_close(t(x1, x2), y + t.g(y))
        t.f.attn.norm_q.weight.mul_(2)  # the residual shares the attention's Q norm
        assert not torch.allclose(t.f.attn.pool_like_q(t.res_proj(fused), t.f.grid), res)


def test_transition_drop_path_drops_the_whole_block_output():
    torch.manual_seed(0)
    t = timm.create_model("rev_mvit_tiny").stages[1].train()
    t.drop_path = 0.5
    x = torch.randn(64, 64, 32)
    with torch.no_grad():
        out = t(x, x)
    dropped = out.flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < 64


def test_each_run_restarts_from_two_copies_of_its_input(monkeypatch):
    model = timm.create_model("rev_mvit_tiny").eval()
    seen = []
    for stack in model.stages[::2]:
        original = stack.forward
        monkeypatch.setattr(stack, "forward", lambda a, b, f=original: (seen.append(a is b), f(a, b))[1])
    model(torch.randn(IMAGE))
    assert seen == [True, True, True]


def test_separate_position_embeddings_add_spatial_per_frame_and_temporal_per_token():
    model = timm.create_model("rev_mvit_tiny_video")
    torch.nn.init.zeros_(model.patch_embed.proj.weight)
    torch.nn.init.zeros_(model.patch_embed.proj.bias)
    tokens = model._embed(torch.randn(1, 3, 4, 32, 32))[0].view(2, 64, 32)  # grid (2, 8, 8)
    for t in range(2):
        torch.testing.assert_close(tokens[t], model.pos_embed_spatial[0] + model.pos_embed_temporal[0, t])


# -- the timm face ----------------------------------------------------------------------------------

def test_registered_in_timm_without_touching_timms_mvitv2():
    assert set(NAMES) <= set(timm.list_models("*mvit*"))
    assert {timm.models.model_entrypoint(n).__module__ for n in NAMES} == {"revvit.models.mvit"}
    assert timm.models.model_entrypoint("mvitv2_tiny").__module__ == "timm.models.mvitv2"


@pytest.mark.parametrize("name", ["rev_mvit_base", "mvit_base"])
def test_base_feature_maps_have_strides_4_8_16_32(name):
    model = timm.create_model(name, img_size=64)  # small input: the same layers, a quick forward
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [m.shape[-2:] for m in maps] == [(64 // r, 64 // r) for r in (4, 8, 16, 32)]
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.feature_info]
    mult = 2 if name.startswith("rev") else 1
    assert [f["num_chs"] for f in model.feature_info] == [mult * c for c in (96, 192, 384, 768)]


@pytest.mark.parametrize("name,shape", [(n, IMAGE) for n in ("rev_mvit_tiny", "mvit_tiny")]
                         + [(n, CLIP) for n in ("rev_mvit_tiny_video", "mvit_tiny_video")])
def test_tiny_models_forward_heads_and_features(name, shape):
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(shape)
    feats = model.forward_features(x)
    assert model(x).shape == (3, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    for m, info in zip(maps, model.feature_info):
        assert m.shape[:2] == (3, info["num_chs"]) and m.ndim == len(shape)
        assert m.shape[-1] == shape[-1] // info["reduction"]
    model.reset_classifier(0)
    assert model(x).shape == (3, model.num_features)
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


def test_features_only_wraps_forward_intermediates():
    model = timm.create_model("rev_mvit_tiny", features_only=True, out_indices=(1, 2))
    maps = model(torch.randn(IMAGE))
    assert [m.shape for m in maps] == [(3, 128, 4, 4), (3, 256, 2, 2)]


def test_images_and_one_frame_clips_are_interchangeable():
    model = timm.create_model("rev_mvit_tiny_video", num_frames=1).eval()
    x = torch.randn(IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.unsqueeze(2)))


@pytest.mark.parametrize("name,shape,match", [
    ("rev_mvit_tiny", (2, 3, 16, 16), r"frames of size 32x32.*\(batch, 3, 32, 32\)"),
    ("rev_mvit_tiny_video", (2, 3, 32, 32), r"clips \(batch, 3, 4, 32, 32\)"),
    ("mvit_tiny", (2, 1, 32, 32), "3 input channels"),
])
def test_wrong_input_names_the_expected_shape(name, shape, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model(name)(torch.randn(shape))


@pytest.mark.parametrize("options,match", [
    (dict(transition_layers=(1,)), "layer 3 changes the width 64->128 and pools Q"),
    (dict(transition_layers=(0, 1, 3)), "transition layer 0 must follow a reversible block"),
    (dict(transition_layers=(1, 2, 3)), "transition layer 2 must follow a reversible block"),
    (dict(transition_layers=(1, 3, 5)), "must end with a reversible run"),
    (dict(transition_layers=(1, 3, 9)), r"outside the model's layers 0\.\.5"),
    (dict(pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2), (4, 1, 2, 2)), transition_layers=(1, 3)), "layer 4 pools Q"),
    (dict(pre_q_fusion="concat"), "pre_q_fusion must be"),
    (dict(dim_mul=((9, 2.0),)), "dim_mul names layer 9"),
])
def test_invalid_layouts_are_rejected_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("rev_mvit_tiny", **options)


def test_a_transition_where_nothing_changes_is_allowed():
    model = RevMViT(MViTConfig(**{**_tiny_cfg(), "stage_depths": (1, 2, 4), "transition_layers": (1, 3, 5)}))
    assert [type(s).__name__ for s in model.stages] == ["ReversibleStack", "StageTransition"] * 3 + [
        "ReversibleStack"]
    assert model(torch.randn(IMAGE)).shape == (3, 10)


def test_twin_ignores_transitions_and_builds_the_same_attention_layers():
    rev, twin = timm.create_model("rev_mvit_tiny"), timm.create_model("mvit_tiny")
    assert [(s.dim_out, s.num_heads, s.grid_out, s.stride_kv) for s in rev.specs] == [
        (s.dim_out, s.num_heads, s.grid_out, s.stride_kv) for s in twin.specs]
    assert isinstance(twin, MViT) and twin.blocks[1].pool_skip is not None
    assert math.isclose(twin.specs[-1].drop_path, 0.1, rel_tol=1e-6)


def _tiny_cfg():
    return dict(img_size=32, num_classes=10, embed_dim=32, pool_kv_stride_adaptive=(1, 2, 2))


def test_stage_depths_refuse_explicit_values_that_contradict_them():
    cfg = MViTConfig(**_tiny_cfg(), stage_depths=(1, 2, 3))
    assert cfg.depth == 6 and cfg.dim_mul == ((1, 2.0), (3, 2.0)) and cfg.transition_layers == (1, 3)
    # what stage_depths implies, given again (as a saved config's kwargs are, lists from JSON), is no conflict
    again = {k: [list(v) for v in getattr(cfg, k)] for k in ("dim_mul", "head_mul", "pool_q_stride")}
    assert MViTConfig(**_tiny_cfg(), depth=6, stage_depths=[1, 2, 3], **again) == cfg
    for name, value in [("dim_mul", ((1, 2.0),)), ("head_mul", ((2, 2.0), (3, 2.0))),
                        ("pool_q_stride", ((1, 1, 2, 2), (3, 1, 1, 1))), ("depth", 8)]:
        with pytest.raises(ValueError, match=f"{name}=.* conflicts with stage_depths=\\(1, 2, 3\\)"):
            MViTConfig(**{**_tiny_cfg(), name: value}, stage_depths=(1, 2, 3))


def test_stage_depths_through_timm_replace_the_variants_layout():
    model = timm.create_model("rev_mvit_tiny", stage_depths=(2, 2, 4))
    assert model.cfg.depth == 8 and [s.index for s in model.specs if s.transition] == [2, 4]
    with pytest.raises(ValueError, match="dim_mul=.* conflicts with stage_depths"):
        timm.create_model("rev_mvit_tiny", stage_depths=(2, 2, 4), dim_mul=((1, 2.0),))


def test_layout_is_pure_arithmetic_on_any_device():
    with torch.device("meta"):  # e.g. counting parameters without allocating them
        model = timm.create_model("rev_mvit_base")
    assert [s.index for s in model.specs if s.transition] == [1, 3, 14]
    assert math.isclose(model.specs[-1].drop_path, 0.1, rel_tol=1e-6)
