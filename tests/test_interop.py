"""Official SlowFast checkpoints and safetensors: exact loading, the official math, safe and atomic files."""
import builtins
import os
import re
import sys
import types

import pytest
import timm
import torch

import revvit
from revvit.interop import CheckpointError, convert, read_metadata
from revvit.interop.slowfast_config import merge_defaults, parse_cfg
from revvit.models.mvit import RevMViT
from revvit.models.vit import RevViT

sys.path.insert(0, os.path.dirname(__file__))
from official_format import official_checkpoint, official_forward, write_pyth  # noqa: E402
from official_modules import OfficialRevMViT  # noqa: E402
from official_modules import merged as official_merged  # noqa: E402


def _jitter(model, seed=0):
    """Move every weight off its init (LayerNorm weights off 1, biases off 0.02) so maps are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def rev_vit(**kw):
    torch.manual_seed(0)
    return _jitter(RevViT(**{**dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=5),
                             **kw}))


_MVIT = dict(img_size=32, num_classes=5, embed_dim=16, depth=5, num_heads=1, dim_mul=((1, 2.0), (3, 2.0)),
             head_mul=((1, 2.0), (3, 2.0)), pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2)),
             pool_kv_stride_adaptive=(1, 4, 4), transition_layers=(1, 3))


def rev_mvit_image():
    """ImageNet layout: Conv2d 7/4/3 stem, separate qkv with bias, concat_linear_2 fusion."""
    torch.manual_seed(0)
    return _jitter(RevMViT(**_MVIT, pool_kvq_kernel=(1, 3, 3), pre_q_fusion="concat_linear_2"))


def rev_mvit_video():
    """Kinetics layout: Conv3d stem, separate space/time position embeddings, fused qkv without bias, avg."""
    torch.manual_seed(0)
    return _jitter(RevMViT(**_MVIT, num_frames=4, pool_kvq_kernel=(3, 3, 3), pre_q_fusion="avg", patch_2d=False,
                           patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3),
                           sep_pos_embed=True, separate_qkv=False, qkv_bias=False))


IMAGE, VIDEO = (2, 3, 32, 32), (2, 3, 4, 32, 32)
# name -> (model factory, official_checkpoint options, input shape)
CASES = {
    "rev_vit": (rev_vit, {}, IMAGE),
    "rev_mvit_image_concat_linear": (rev_mvit_image, {}, IMAGE),
    # as the official K400 yaml: tuples in the config, CLS_EMBED_ON True (the reversible code ignores it)
    "rev_mvit_video_avg_fused_qkv": (rev_mvit_video, {"cfg_as": "yaml_tuples", "MVIT.CLS_EMBED_ON": True}, VIDEO),
}


def _write(tmp_path, name, **override):
    make, options, shape = CASES[name]
    source = make()
    ckpt = official_checkpoint(source, **{**options, **override})
    return source, ckpt, write_pyth(tmp_path / f"{name}.pyth", ckpt=ckpt), shape


def _same_outputs(a, b, shape, seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# -- loading official checkpoints exactly ---------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_official_checkpoint_loads_with_bit_identical_outputs(tmp_path, name):
    source, _, path, shape = _write(tmp_path, name)
    model = revvit.load_slowfast(path)
    assert type(model) is type(source)
    assert _same_outputs(source, model, shape)


@pytest.mark.parametrize("name", list(CASES))
def test_loaded_model_matches_the_official_forward_logits_and_input_gradients(tmp_path, name):
    _, ckpt, path, shape = _write(tmp_path, name)
    model = revvit.load_slowfast(path)
    cfg = merge_defaults(parse_cfg(ckpt["cfg"]))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    w = torch.randn(shape[0], 5, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for forward in (model, lambda v: official_forward(ckpt["model_state"], cfg, v)):
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-5


def test_loaded_model_is_in_eval_mode_and_returns_logits_not_probabilities(tmp_path):
    _, _, path, shape = _write(tmp_path, "rev_vit")
    model = revvit.load_slowfast(path)
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert not torch.allclose(out.sum(-1), torch.ones(shape[0]))


def test_fused_qkv_rev_vit_checkpoint_is_split_into_q_k_v(tmp_path):
    source, ckpt, path, shape = _write(tmp_path, "rev_vit", fused_qkv=True)
    assert "rev_backbone.layers.0.F.attn.qkv.weight" in ckpt["model_state"]
    assert _same_outputs(source, revvit.load_slowfast(path), shape)


def test_module_prefix_from_distributed_training_is_stripped(tmp_path):
    source, _, path, shape = _write(tmp_path, "rev_mvit_image_concat_linear", prefix="module.")
    assert _same_outputs(source, revvit.load_slowfast(path), shape)


def test_config_given_as_a_plain_dict_is_accepted(tmp_path):
    source, _, path, shape = _write(tmp_path, "rev_vit", cfg_as="dict")
    assert _same_outputs(source, revvit.load_slowfast(path), shape)


def test_missing_config_keys_take_the_official_defaults(tmp_path):
    # no SEPARATE_QKV (default False: fused) and no PRE_Q_FUSION (default avg), as the official K400 yaml
    source, ckpt, _, shape = _write(tmp_path, "rev_mvit_video_avg_fused_qkv", cfg_as="dict")
    del ckpt["cfg"]["MVIT"]["SEPARATE_QKV"], ckpt["cfg"]["MVIT"]["REV"]["PRE_Q_FUSION"]
    model = revvit.load_slowfast(write_pyth(tmp_path / "defaults.pyth", ckpt=ckpt))
    assert model.cfg.separate_qkv is False and model.cfg.pre_q_fusion == "avg"
    assert _same_outputs(source, model, shape)


def test_pickled_yacs_cfgnode_is_read_as_plain_data_without_importing_yacs(tmp_path, monkeypatch):
    node_module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    node_module.CfgNode = CfgNode
    source, ckpt, _, shape = _write(tmp_path, "rev_vit", cfg_as="dict")

    def to_node(d):
        node = CfgNode({k: to_node(v) if isinstance(v, dict) else v for k, v in d.items()})
        node.__dict__["__immutable__"] = True
        return node

    ckpt["cfg"] = to_node(ckpt["cfg"])
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", node_module)
    path = write_pyth(tmp_path / "cfgnode.pyth", ckpt=ckpt)
    monkeypatch.delitem(sys.modules, "yacs.config")
    monkeypatch.delitem(sys.modules, "yacs")
    assert _same_outputs(source, revvit.load_slowfast(path), shape)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_checkpoint_with_arbitrary_python_objects_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "was_run"
    _, ckpt, _, _ = _write(tmp_path, "rev_vit")
    ckpt["extra"] = _RunsCode(str(marker))
    path = write_pyth(tmp_path / "evil.pyth", ckpt=ckpt)
    with pytest.raises(CheckpointError, match="Python objects other than tensors") as e:
        revvit.load_slowfast(path)
    assert "evil.pyth" in str(e.value) and not marker.exists()


# -- refusing what cannot be mapped ---------------------------------------------------------------

def test_missing_key_is_refused_naming_the_key(tmp_path):
    _, ckpt, _, _ = _write(tmp_path, "rev_vit")
    del ckpt["model_state"]["rev_backbone.layers.2.G.mlp.fc2.bias"]
    path = write_pyth(tmp_path / "missing.pyth", ckpt=ckpt)
    with pytest.raises(CheckpointError, match=r"missing.*stack\.blocks\.2\.g\.mlp\.fc2\.bias"):
        revvit.load_slowfast(path)


def test_unexpected_key_is_refused_naming_the_key(tmp_path):
    _, ckpt, _, _ = _write(tmp_path, "rev_mvit_image_concat_linear")
    ckpt["model_state"]["cls_token"] = torch.zeros(1, 1, 16)
    path = write_pyth(tmp_path / "extra.pyth", ckpt=ckpt)
    with pytest.raises(CheckpointError, match=r"no place in the model: cls_token"):
        revvit.load_slowfast(path)


def test_wrong_shape_is_refused_naming_both_shapes(tmp_path):
    _, ckpt, _, _ = _write(tmp_path, "rev_vit")
    ckpt["model_state"]["pos_embed"] = torch.zeros(1, 17, 32)
    path = write_pyth(tmp_path / "shape.pyth", ckpt=ckpt)
    with pytest.raises(CheckpointError, match=r"pos_embed \(1, 17, 32\) vs model \(1, 16, 32\)"):
        revvit.load_slowfast(path)


def test_truncated_file_gives_a_clear_error(tmp_path):
    _, _, path, _ = _write(tmp_path, "rev_vit")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="(?s)not a readable PyTorch checkpoint.*truncated, corrupt") as e:
        revvit.load_slowfast(path)
    assert str(path) in str(e.value)


def test_random_bytes_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "noise.pyth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        revvit.load_slowfast(path)


def test_missing_file_gives_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        revvit.load_slowfast(tmp_path / "absent.pyth")


def test_a_torch_file_that_is_not_a_slowfast_checkpoint_is_refused(tmp_path):
    path = tmp_path / "state_dict.pth"
    torch.save(rev_vit().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a SlowFast checkpoint: no 'model_state' or 'cfg'"):
        revvit.load_slowfast(path)


@pytest.mark.parametrize("key, value", [("MVIT.REL_POS_SPATIAL", True), ("MVIT.USE_MEAN_POOLING", True),
                                        ("MVIT.REV.ENABLE", False), ("MVIT.REV.RESPATH_FUSE", "avg")])
def test_config_revvit_cannot_reproduce_exactly_is_refused_naming_the_key(tmp_path, key, value):
    _, _, path, _ = _write(tmp_path, "rev_vit", **{key: value})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + "="):
        revvit.load_slowfast(path)


def test_config_whose_reversible_layer_changes_shape_is_refused_by_the_models_layout(tmp_path):
    _, _, path, _ = _write(tmp_path, "rev_mvit_image_concat_linear", **{"MVIT.REV.BUFFER_LAYERS": [1]})
    with pytest.raises(CheckpointError, match=r"BUFFER_LAYERS=\[1\].*layer 3 changes the width 32->64"):
        revvit.load_slowfast(path)


def test_overrides_apply_on_top_of_the_config(tmp_path):
    _, _, path, _ = _write(tmp_path, "rev_vit")
    assert revvit.load_slowfast(path, drop_path_rate=0.0).cfg.drop_path_rate == 0.0


def test_override_that_changes_the_head_is_refused_with_the_way_to_do_it(tmp_path):
    _, _, path, _ = _write(tmp_path, "rev_vit")
    with pytest.raises(CheckpointError, match="reset_classifier"):
        revvit.load_slowfast(path, num_classes=7)


# -- safetensors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_safetensors_round_trip_is_exact(tmp_path, name):
    make, _, shape = CASES[name]
    source = make()
    revvit.save(source, tmp_path / "m.safetensors")
    model = revvit.load(tmp_path / "m.safetensors")
    assert type(model) is type(source) and _same_outputs(source, model, shape)


def test_saved_file_holds_the_state_dict_keys_and_the_metadata_to_rebuild(tmp_path):
    from safetensors.torch import load_file

    source = rev_mvit_video()
    revvit.save(source, tmp_path / "m.safetensors")
    assert set(load_file(tmp_path / "m.safetensors")) == set(source.state_dict())
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["format"] == "revvit" and meta["revvit_version"] == revvit.__version__
    assert meta["model"] == "rev_mvit_base_16x4" and meta["model_kwargs"]["num_frames"] == 4


def test_convert_round_trip_is_exact_and_records_the_source(tmp_path):
    source, _, path, shape = _write(tmp_path, "rev_mvit_video_avg_fused_qkv")
    convert(path, tmp_path / "out.safetensors")
    meta = read_metadata(tmp_path / "out.safetensors")
    assert meta["source"] == path.name and meta["slowfast_cfg"]["MVIT"]["REV"]["ENABLE"] is True
    assert _same_outputs(source, revvit.load(tmp_path / "out.safetensors"), shape)


@pytest.mark.parametrize("name", ["rev_vit", "rev_mvit_image_concat_linear"])
def test_timm_create_model_loads_a_converted_file(tmp_path, name):
    source, _, path, shape = _write(tmp_path, name)
    dst = str(tmp_path / "out.safetensors")
    convert(path, dst)
    meta = read_metadata(dst)
    kw = meta["model_kwargs"]
    model = timm.create_model(meta["model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=dst, num_classes=kw["num_classes"]), **kw).eval()
    assert _same_outputs(source, model, shape)


def test_failed_convert_leaves_an_existing_destination_untouched(tmp_path):
    dst = tmp_path / "good.safetensors"
    revvit.save(rev_vit(), dst)
    before = dst.read_bytes()
    bad = tmp_path / "bad.pyth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError):
        convert(bad, dst, overwrite=True)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pyth", "good.safetensors"]  # no temp files


def test_convert_does_not_replace_an_existing_destination_unless_asked(tmp_path):
    _, _, path, _ = _write(tmp_path, "rev_vit")
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep")
    with pytest.raises(CheckpointError, match="(?s)exists.*--force"):
        convert(path, dst)
    assert dst.read_bytes() == b"keep"
    convert(path, dst, overwrite=True)
    assert read_metadata(dst)["model"].startswith("rev_vit")


def test_truncated_safetensors_gives_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    revvit.save(rev_vit(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="(?s)m.safetensors.*truncated or corrupt"):
        revvit.load(path)


def test_revvit_load_reads_official_pyth_files_too(tmp_path):
    source, _, path, shape = _write(tmp_path, "rev_vit")
    assert _same_outputs(source, revvit.load(path), shape)


def test_official_yaml_text_with_python_tuples_and_literal_strings_parses(tmp_path):
    text = "MVIT:\n  PATCH_KERNEL: (3, 7, 7)\n  PATCH_STRIDE: !!python/tuple [2, 4, 4]\n  DROPPATH_RATE: 5e-2\n"
    cfg = parse_cfg(text)
    assert cfg["MVIT"]["PATCH_KERNEL"] == (3, 7, 7) and cfg["MVIT"]["PATCH_STRIDE"] == [2, 4, 4]
    assert cfg["MVIT"]["DROPPATH_RATE"] == 0.05
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_cfg("!!python/object/apply:os.system ['true']")


# -- an independent, module-based restatement of the official model (tests/official_modules.py) ---

_YAML_COMMON = "MODEL: {NUM_CLASSES: 7, ARCH: mvit, MODEL_NAME: MViT, DROPOUT_RATE: 0.0}\n"
# Reduced copies of the official configs: only sizes changed, every other key as in the released YAML
# (missing keys take the official defaults: e.g. the K400 file has no SEPARATE_QKV -> fused qkv, no
# PRE_Q_FUSION -> avg, QKV_BIAS False, CLS_EMBED_ON True which the reversible model never uses). The
# image one adds a stride-1 Q entry (MViTv1 style): reversible layer 4 then pools Q with kernel (1, 3, 3).
OFFICIAL_YAMLS = {
    "REV_VIT_S": (_YAML_COMMON + """
DATA: {NUM_FRAMES: 1, TRAIN_CROP_SIZE: 32, TEST_CROP_SIZE: 32, INPUT_CHANNEL_NUM: [3]}
MVIT:
  PATCH_2D: True
  ZERO_DECAY_POS_CLS: False
  MODE: "conv"
  CLS_EMBED_ON: False
  PATCH_KERNEL: [8, 8]
  PATCH_STRIDE: [8, 8]
  PATCH_PADDING: [0, 0]
  EMBED_DIM: 32
  NUM_HEADS: 2
  MLP_RATIO: 4.0
  QKV_BIAS: True
  DROPPATH_RATE: 0.1
  DEPTH: 3
  NORM: "layernorm"
  POOL_KV_STRIDE: []
  SEPARATE_QKV : True
  REV: {ENABLE: True, RESPATH_FUSE: "concat", RES_PATH: "conv"}
""", (2, 3, 32, 32)),
    "REV_MVIT_B_16_CONV": (_YAML_COMMON + """
DATA: {NUM_FRAMES: 1, TRAIN_CROP_SIZE: 64, TEST_CROP_SIZE: 64, INPUT_CHANNEL_NUM: [3]}
MVIT:
  PATCH_2D: True
  ZERO_DECAY_POS_CLS: False
  MODE: "conv"
  CLS_EMBED_ON: False
  PATCH_KERNEL: [7, 7]
  PATCH_STRIDE: [4, 4]
  PATCH_PADDING: [3, 3]
  EMBED_DIM: 16
  NUM_HEADS: 1
  MLP_RATIO: 4.0
  QKV_BIAS: True
  DROPPATH_RATE: 0.1
  DEPTH: 6
  NORM: "layernorm"
  DIM_MUL: [[1, 2.0], [3, 2.0]]
  HEAD_MUL: [[1, 2.0], [3, 2.0]]
  POOL_KVQ_KERNEL: [1, 3, 3]
  POOL_KV_STRIDE_ADAPTIVE: [1, 4, 4]
  POOL_Q_STRIDE: [[1, 1, 2, 2], [3, 1, 2, 2], [4, 1, 1, 1]]
  SEPARATE_QKV : True
  REV:
    ENABLE: True
    RESPATH_FUSE: "concat"
    BUFFER_LAYERS : [1, 3]
    RES_PATH : "conv"
    PRE_Q_FUSION: "concat_linear_2"
""", (2, 3, 64, 64)),
    "REV_MVIT_B_16x4_CONV": (_YAML_COMMON + """
DATA: {NUM_FRAMES: 4, SAMPLING_RATE: 4, TRAIN_CROP_SIZE: 64, TEST_CROP_SIZE: 64, INPUT_CHANNEL_NUM: [3]}
MVIT:
  ZERO_DECAY_POS_CLS: False
  CLS_EMBED_ON: True
  SEP_POS_EMBED: True
  USE_ABS_POS: True
  DEPTH: 6
  NUM_HEADS: 1
  EMBED_DIM: 16
  PATCH_KERNEL: (3, 7, 7)
  PATCH_STRIDE: (2, 4, 4)
  PATCH_PADDING: (1, 3, 3)
  MLP_RATIO: 4.0
  QKV_BIAS: False
  DROPPATH_RATE: 0.05
  NORM: "layernorm"
  MODE: "conv"
  DIM_MUL: [[1, 2.0], [3, 2.0]]
  HEAD_MUL: [[1, 2.0], [3, 2.0]]
  POOL_KVQ_KERNEL: [3, 3, 3]
  POOL_KV_STRIDE_ADAPTIVE: [1, 8, 8]
  POOL_Q_STRIDE: [[1, 1, 2, 2], [3, 1, 2, 2]]
  REV:
    ENABLE: True
    RESPATH_FUSE: "concat"
    BUFFER_LAYERS : [1, 3]
    RES_PATH : "conv"
""", (2, 3, 4, 64, 64)),
}


def _official_structured(tmp_path, name, extra_state=None):
    """(official-structured model with random weights, path of its .pyth, input shape)."""
    text, shape = OFFICIAL_YAMLS[name]
    torch.manual_seed(0)
    ref = OfficialRevMViT(official_merged(text)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r * p[0].numel() ** -0.5)
            else:
                p.copy_(r * 0.2 + (1.0 if "norm" in key and key.endswith("weight") else 0.0))
    state = {**ref.state_dict(), **(extra_state or {})}
    path = write_pyth(tmp_path / f"{name}.pyth", ckpt={"model_state": state, "cfg": text, "epoch": 1})
    return ref, path, shape


@pytest.mark.parametrize("name", list(OFFICIAL_YAMLS))
def test_official_structured_model_matches_loaded_model_logits_and_input_gradients(tmp_path, name):
    # keys come from the official module layout (not from revvit), the layer arithmetic from the config
    ref, path, shape = _official_structured(tmp_path, name)
    model = revvit.load_slowfast(path)
    assert model.backprop == "reversible"  # the input gradient goes through reversible backprop
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    outs, grads = [], []
    for forward in (ref, model):
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-5


def test_class_token_of_a_config_with_cls_embed_on_is_dropped_with_a_note(tmp_path):
    # The K400 yaml says CLS_EMBED_ON True; the official reversible model cannot use a class token (the
    # official loader skips weights the model does not have), so the outputs do not depend on it.
    extra = {"cls_token": torch.randn(1, 1, 16), "pos_embed_class": torch.randn(1, 1, 16)}
    ref, path, shape = _official_structured(tmp_path, "REV_MVIT_B_16x4_CONV", extra)
    model, info = revvit.interop.slowfast.load_slowfast_with_info(path)
    assert any("cls_token" in n for n in info["notes"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)



# -- the timm name recorded for a model --------------------------------------------------------------

def _zero_weights(name, **kw):
    """Registered model `name` with zero weights, made without the cost of its init (the name's layout is all
    a naming test needs)."""
    with torch.device("meta"):
        model = timm.create_model(name, **kw)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    return model.eval()


@pytest.mark.parametrize("name", ["rev_vit_small_patch16_224", "rev_vit_base_patch16_224"])
def test_official_rev_vit_is_named_after_the_registered_size_it_has(tmp_path, name):
    path = write_pyth(tmp_path / "official.pyth", _zero_weights(name))
    assert revvit.interop.model_spec(revvit.load_slowfast(path))[0] == name  # what `revvit convert` prints


def test_converted_official_rev_vit_s_records_and_reloads_as_rev_vit_s(tmp_path):
    name = "rev_vit_small_patch16_224"
    path = write_pyth(tmp_path / "REV_VIT_S.pyth", _zero_weights(name))
    convert(path, tmp_path / "converted.safetensors")
    assert read_metadata(tmp_path / "converted.safetensors")["model"] == name
    assert revvit.load(tmp_path / "converted.safetensors").pretrained_cfg["architecture"] == name


def test_official_rev_mvit_is_named_after_the_registered_layout_it_has(tmp_path):
    for name in ("rev_mvit_tiny", "rev_mvit_tiny_video"):
        path = write_pyth(tmp_path / f"{name}.pyth", _zero_weights(name))
        assert revvit.interop.model_spec(revvit.load_slowfast(path))[0] == name


def test_run_options_do_not_change_the_variant_name():
    torch.manual_seed(0)
    model = RevViT(embed_dim=192, depth=12, num_heads=3, img_size=32, in_chans=1, num_classes=5,
                   drop_path_rate=0.3, global_pool="")
    assert revvit.interop.model_spec(model)[0] == "rev_vit_tiny_patch16_224"


def test_rev_vit_of_no_registered_size_is_rebuilt_from_its_kwargs(tmp_path):
    source = rev_vit()  # D 32, 3 blocks, 2 heads: no registered variant
    revvit.save(source, tmp_path / "m.safetensors")
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["model_kwargs"]["embed_dim"] == 32 and meta["model_kwargs"]["depth"] == 3
    assert _same_outputs(source, revvit.load(tmp_path / "m.safetensors"), IMAGE)


def test_a_model_built_by_name_keeps_that_name():
    model = timm.create_model("rev_vit_small_patch16_224", embed_dim=32, depth=2, num_heads=2)
    assert revvit.interop.model_spec(model)[0] == "rev_vit_small_patch16_224"  # timm's way: name plus kwargs


# -- the crop size of an official config ------------------------------------------------------------

def test_write_pyth_records_one_crop_size_for_a_model_built_with_a_pair(tmp_path):
    source = _zero_weights("rev_vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2)
    assert source.cfg.img_size == (224, 224)  # timm passes its pretrained cfg's input size
    cfg = parse_cfg(torch.load(write_pyth(tmp_path / "m.pyth", source), weights_only=False)["cfg"])
    assert cfg["DATA"]["TRAIN_CROP_SIZE"] == 224 and cfg["DATA"]["TEST_CROP_SIZE"] == 224


def test_square_crop_size_given_as_a_list_is_read_as_its_side(tmp_path):
    source, _, path, shape = _write(tmp_path, "rev_vit", **{"DATA.TRAIN_CROP_SIZE": [32, 32],
                                                            "DATA.TEST_CROP_SIZE": [32, 32]})
    model, info = revvit.interop.load_slowfast_with_info(path)
    assert model.cfg.img_size == 32 and _same_outputs(source, model, shape)
    assert not any("TEST_CROP_SIZE" in note for note in info["notes"])  # [32, 32] is the same crop as 32


@pytest.mark.parametrize("crop", [[32, 16], [32], [32, 32, 32], "large", 0, True])
def test_crop_size_that_is_not_one_square_side_is_refused_naming_the_key(tmp_path, crop):
    _, _, path, _ = _write(tmp_path, "rev_vit", **{"DATA.TRAIN_CROP_SIZE": crop})
    with pytest.raises(CheckpointError, match=r"DATA\.TRAIN_CROP_SIZE must be an integer >= 1 or a square \[n, n\], "
                                              rf"got {re.escape(repr(crop))}"):
        convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("key,value", [("MVIT.EMBED_DIM", [96]), ("MVIT.DEPTH", 0), ("DATA.NUM_FRAMES", "one"),
                                       ("MVIT.MLP_RATIO", [4.0])])
def test_official_size_of_the_wrong_kind_is_refused_naming_the_key(tmp_path, key, value):
    _, _, path, _ = _write(tmp_path, "rev_vit", **{key: value})
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} must be"):
        revvit.load_slowfast(path)
