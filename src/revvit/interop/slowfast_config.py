"""The training config embedded in a SlowFast checkpoint: parse it safely, merge it over the official
defaults, and read off the architecture it describes.

A SlowFast checkpoint stores its config as YAML text (the output of the config node's `dump()`); older
or hand-made files may hold a plain dict instead. Only the keys that decide the architecture of the
reversible models are kept here, with the defaults of `slowfast/config/defaults.py`: a YAML value
overrides the default, a key the YAML does not mention takes the default, exactly as SlowFast merges its
configs. `read_arch` translates the merged config into the options of a revvit model; the per-layer
arithmetic (widths, heads, pooling, which layers change shape) is the model's own `layer_layout`.
"""
from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

from ..models.mvit_layout import MViTConfig, layer_layout, parse_fusion

__all__ = ["OFFICIAL_DEFAULTS", "parse_cfg", "merge_defaults", "ArchSpec", "read_arch"]

# The official defaults of every key that shapes a Rev-ViT / Rev-MViT (values as in SlowFast's
# `slowfast/config/defaults.py`). Keys absent here are carried along but never read.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "MODEL": {
        "MODEL_NAME": "SlowFast",
        "ARCH": "slowfast",
        "NUM_CLASSES": 400,
        "DROPOUT_RATE": 0.5,       # dropout before the classifier
        "HEAD_ACT": "softmax",     # applied by the official head in eval mode only
        "ACT_CHECKPOINT": False,
        "DETACH_FINAL_FC": False,
    },
    "DATA": {
        "NUM_FRAMES": 8,
        "TRAIN_CROP_SIZE": 224,
        "TEST_CROP_SIZE": 256,
        "INPUT_CHANNEL_NUM": [3, 3],
    },
    "DETECTION": {"ENABLE": False},
    "CONTRASTIVE": {"NUM_MLP_LAYERS": 1},
    "MVIT": {
        "MODE": "conv",
        "POOL_FIRST": False,
        "CLS_EMBED_ON": True,
        "PATCH_KERNEL": [3, 7, 7],
        "PATCH_STRIDE": [2, 4, 4],
        "PATCH_PADDING": [2, 4, 4],
        "PATCH_2D": False,
        "EMBED_DIM": 96,
        "NUM_HEADS": 1,
        "MLP_RATIO": 4.0,
        "QKV_BIAS": True,
        "DROPPATH_RATE": 0.1,
        "LAYER_SCALE_INIT_VALUE": 0.0,
        "DEPTH": 16,
        "NORM": "layernorm",
        "DIM_MUL": [],
        "HEAD_MUL": [],
        "POOL_KV_STRIDE": [],
        "POOL_KV_STRIDE_ADAPTIVE": None,
        "POOL_Q_STRIDE": [],
        "POOL_KVQ_KERNEL": None,
        "ZERO_DECAY_POS_CLS": True,
        "NORM_STEM": False,
        "SEP_POS_EMBED": False,
        "DROPOUT_RATE": 0.0,
        "USE_ABS_POS": True,
        "REL_POS_SPATIAL": False,
        "REL_POS_TEMPORAL": False,
        "REL_POS_ZERO_INIT": False,
        "RESIDUAL_POOLING": False,
        "DIM_MUL_IN_ATT": False,
        "SEPARATE_QKV": False,
        "HEAD_INIT_SCALE": 1.0,
        "USE_MEAN_POOLING": False,
        "USE_FIXED_SINCOS_POS": False,
        "REV": {
            "ENABLE": False,
            "RESPATH_FUSE": "concat",
            "BUFFER_LAYERS": [],
            "RES_PATH": "conv",
            "PRE_Q_FUSION": "avg",
        },
    },
}


class _CfgLoader(yaml.SafeLoader):
    """YAML's safe loader, plus the `!!python/tuple` tag that config dumps use for tuples (built as a
    plain tuple; no other Python tag is accepted)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


_CfgLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def _decode(value: Any) -> Any:
    """Decode values the way SlowFast's config system does: a string that is a Python literal (a tuple
    written "(3, 7, 7)", "1e-6", "None") becomes that literal; any other string stays a string."""
    if isinstance(value, Mapping):
        return {str(k): _decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decode(v) for v in value]
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value
    return value


def parse_cfg(cfg: Any) -> dict:
    """The checkpoint's `cfg` entry (YAML text, bytes, or a nested mapping) as a plain nested dict.

    Raises ValueError (with the reason) for anything else or for YAML that is not a mapping.
    """
    if isinstance(cfg, bytes):
        cfg = cfg.decode("utf-8")
    if isinstance(cfg, str):
        try:
            cfg = yaml.load(cfg, Loader=_CfgLoader)
        except yaml.YAMLError as e:
            raise ValueError(f"the 'cfg' entry is not valid YAML ({e})") from None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"the 'cfg' entry must be YAML text or a mapping, got {type(cfg).__name__}")
    return _decode(cfg)


def merge_defaults(cfg: Mapping, defaults: Mapping = OFFICIAL_DEFAULTS) -> dict:
    """`cfg` merged over `defaults`, recursively (values of `cfg` win)."""
    out = copy.deepcopy(dict(defaults))
    for key, value in cfg.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_defaults(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class ArchSpec:
    """What the merged config says about the model: the family and its constructor kwargs."""

    family: str  # "RevViT" or "RevMViT"
    kwargs: dict
    notes: list[str] = field(default_factory=list)  # config values accepted but without effect in revvit


class UnsupportedConfig(ValueError):
    """The config describes a model revvit cannot reproduce exactly; the message lists the keys."""


def _seq(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UnsupportedConfig(f"{name} must be a list, got {value!r}")


def _int(value: Any, name: str, minimum: int = 1) -> int:
    """An integer config value (an integral float as YAML may write it passes); UnsupportedConfig otherwise."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UnsupportedConfig(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedConfig(f"{name} must be a number, got {value!r}")
    return float(value)


def _crop_size(value: Any, name: str) -> int:
    """A crop side: an integer, or a square [n, n] as some configs write it; UnsupportedConfig otherwise
    (the official MViT takes square crops only)."""
    side = value[0] if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1] else value
    try:
        return _int(side, name)
    except UnsupportedConfig:
        raise UnsupportedConfig(f"{name} must be an integer >= 1 or a square [n, n], got {value!r}") from None


def _check_supported(c: Mapping) -> list[str]:
    """Refuse (listing every offending key) configs whose math revvit does not implement."""
    m, rev = c["MVIT"], c["MVIT"]["REV"]
    problems = []

    def need(ok: bool, key: str, value: Any, want: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r} (revvit supports {want})")

    need(c["MODEL"]["MODEL_NAME"] == "MViT", "MODEL.MODEL_NAME", c["MODEL"]["MODEL_NAME"], "'MViT'")
    need(bool(rev["ENABLE"]), "MVIT.REV.ENABLE", rev["ENABLE"], "True: a reversible model")
    need(not c["DETECTION"]["ENABLE"], "DETECTION.ENABLE", c["DETECTION"]["ENABLE"], "False")
    need(c["CONTRASTIVE"]["NUM_MLP_LAYERS"] == 1, "CONTRASTIVE.NUM_MLP_LAYERS",
         c["CONTRASTIVE"]["NUM_MLP_LAYERS"], "1: a linear head")
    need(m["NORM"] == "layernorm", "MVIT.NORM", m["NORM"], "'layernorm'")
    need(m["MODE"] == "conv", "MVIT.MODE", m["MODE"], "'conv'")
    need(not m["POOL_FIRST"], "MVIT.POOL_FIRST", m["POOL_FIRST"], "False")
    need(not m["REL_POS_SPATIAL"], "MVIT.REL_POS_SPATIAL", m["REL_POS_SPATIAL"], "False")
    need(not m["REL_POS_TEMPORAL"], "MVIT.REL_POS_TEMPORAL", m["REL_POS_TEMPORAL"], "False")
    need(not m["RESIDUAL_POOLING"], "MVIT.RESIDUAL_POOLING", m["RESIDUAL_POOLING"], "False")
    need(bool(m["USE_ABS_POS"]), "MVIT.USE_ABS_POS", m["USE_ABS_POS"], "True")
    need(not m["USE_FIXED_SINCOS_POS"], "MVIT.USE_FIXED_SINCOS_POS", m["USE_FIXED_SINCOS_POS"], "False")
    need(not m["NORM_STEM"], "MVIT.NORM_STEM", m["NORM_STEM"], "False")
    need(not m["USE_MEAN_POOLING"], "MVIT.USE_MEAN_POOLING", m["USE_MEAN_POOLING"],
         "False: LayerNorm, then the mean over tokens")
    need(rev["RESPATH_FUSE"] == "concat", "MVIT.REV.RESPATH_FUSE", rev["RESPATH_FUSE"], "'concat'")
    if _seq(rev["BUFFER_LAYERS"], "MVIT.REV.BUFFER_LAYERS"):
        need(rev["RES_PATH"] == "conv", "MVIT.REV.RES_PATH", rev["RES_PATH"], "'conv'")
        fusion = rev["PRE_Q_FUSION"]
        need(_fusion_option(fusion) is not None, "MVIT.REV.PRE_Q_FUSION", fusion,
             "'avg' or 'concat_linear[_<mult>[_<dropout>]]'")
    return problems


def _fusion_option(mode: Any) -> Optional[str]:
    """The model's `pre_q_fusion` for an official PRE_Q_FUSION, or None if the model has no such fusion.

    The official "concat_linear_<mult>_<dropout>" has a dropout part that acts in training only; the rest
    is the model's to parse.
    """
    if not isinstance(mode, str):
        return None
    parts = mode.split("_")
    if mode.startswith("concat_linear") and len(parts) == 4:
        try:
            float(parts[3])
        except ValueError:
            return None
        mode = "_".join(parts[:3])
    try:
        mult = parse_fusion(mode)
    except ValueError:
        return None
    return "avg" if mult is None else f"concat_linear_{mult:g}"


def read_arch(cfg: Mapping) -> ArchSpec:
    """The revvit family and constructor kwargs equivalent to a merged SlowFast config.

    Raises UnsupportedConfig listing every key whose value revvit cannot reproduce exactly.
    """
    c = cfg
    problems = _check_supported(c)
    if problems:
        raise UnsupportedConfig("the config describes a model revvit cannot reproduce exactly: "
                                + "; ".join(problems))
    m, rev, data, model = c["MVIT"], c["MVIT"]["REV"], c["DATA"], c["MODEL"]
    notes = []
    if m["CLS_EMBED_ON"]:
        notes.append("MVIT.CLS_EMBED_ON=True is ignored: the official reversible model rejects a class token "
                     "and was trained without one (cls_token / pos_embed_class weights, if any, are skipped)")
    if _number(m["DROPOUT_RATE"], "MVIT.DROPOUT_RATE") > 0:
        notes.append(f"MVIT.DROPOUT_RATE={m['DROPOUT_RATE']} (training-time dropout in the official backbone) "
                     "is not reproduced; evaluation is unaffected")
    crop = _crop_size(data["TRAIN_CROP_SIZE"], "DATA.TRAIN_CROP_SIZE")
    try:
        test_crop: Optional[int] = _crop_size(data.get("TEST_CROP_SIZE", crop), "DATA.TEST_CROP_SIZE")
    except UnsupportedConfig:
        test_crop = None  # only a note's subject: the model is built for the training crop
    if test_crop != crop:
        notes.append(f"DATA.TEST_CROP_SIZE={data['TEST_CROP_SIZE']} differs from DATA.TRAIN_CROP_SIZE="
                     f"{data['TRAIN_CROP_SIZE']}; the model is built for the training crop, as the official MViT")
    buffers = sorted(_int(i, "MVIT.REV.BUFFER_LAYERS entries", 0) for i in _seq(rev["BUFFER_LAYERS"],
                                                                                "MVIT.REV.BUFFER_LAYERS"))
    channels = _seq(data["INPUT_CHANNEL_NUM"], "DATA.INPUT_CHANNEL_NUM")
    in_chans = _int(channels[0] if channels else None, "DATA.INPUT_CHANNEL_NUM[0]")
    frames = _int(data["NUM_FRAMES"], "DATA.NUM_FRAMES")
    patch_2d = bool(m["PATCH_2D"])
    kernel, stride, padding = ([_int(v, f"MVIT.{key} entries", minimum) for v in _seq(m[key], f"MVIT.{key}")]
                               for key, minimum in (("PATCH_KERNEL", 1), ("PATCH_STRIDE", 1), ("PATCH_PADDING", 0)))
    n = 2 if patch_2d else 3
    if not (len(kernel) == len(stride) == len(padding) == n):
        raise UnsupportedConfig(f"MVIT.PATCH_KERNEL/STRIDE/PADDING {kernel}/{stride}/{padding} must have {n} "
                                f"values with MVIT.PATCH_2D={patch_2d}")
    if patch_2d and frames != 1:
        raise UnsupportedConfig(f"MVIT.PATCH_2D=True needs DATA.NUM_FRAMES=1 (the official position embedding "
                                f"covers NUM_FRAMES grids), got {frames}")

    official_fusion, fusion = rev["PRE_Q_FUSION"], _fusion_option(rev["PRE_Q_FUSION"])
    if fusion not in (None, "avg") and official_fusion.count("_") == 3 and float(official_fusion.split("_")[3]) > 0:
        notes.append(f"MVIT.REV.PRE_Q_FUSION={official_fusion!r}: its training-time dropout is not reproduced")
    if not buffers:
        fusion = "avg"  # no transition: the fusion is never used (Rev-ViT configs say "concat")

    def pairs(key: str) -> tuple:
        return tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in _seq(m[key], f"MVIT.{key}"))

    def opt(key: str) -> Optional[tuple]:
        return None if m[key] is None else tuple(_int(v, f"MVIT.{key} entries") for v in _seq(m[key], f"MVIT.{key}"))

    kwargs = dict(
        img_size=crop, num_frames=frames, patch_2d=patch_2d, patch_kernel=tuple(kernel),
        patch_stride=tuple(stride), patch_padding=tuple(padding), embed_dim=_int(m["EMBED_DIM"], "MVIT.EMBED_DIM"),
        depth=_int(m["DEPTH"], "MVIT.DEPTH"), num_heads=_int(m["NUM_HEADS"], "MVIT.NUM_HEADS"),
        dim_mul=pairs("DIM_MUL"), head_mul=pairs("HEAD_MUL"),
        pool_q_stride=pairs("POOL_Q_STRIDE"), pool_kvq_kernel=opt("POOL_KVQ_KERNEL"),
        pool_kv_stride=pairs("POOL_KV_STRIDE"), pool_kv_stride_adaptive=opt("POOL_KV_STRIDE_ADAPTIVE"),
        separate_qkv=bool(m["SEPARATE_QKV"]), sep_pos_embed=bool(m["SEP_POS_EMBED"]),
        transition_layers=tuple(buffers), pre_q_fusion=fusion,
        num_classes=_int(model["NUM_CLASSES"], "MODEL.NUM_CLASSES", 0), in_chans=in_chans,
        mlp_ratio=_number(m["MLP_RATIO"], "MVIT.MLP_RATIO"), qkv_bias=bool(m["QKV_BIAS"]),
        drop_rate=_number(model["DROPOUT_RATE"], "MODEL.DROPOUT_RATE"),
        drop_path_rate=_number(m["DROPPATH_RATE"], "MVIT.DROPPATH_RATE"))
    try:
        mvit_cfg = MViTConfig(**kwargs)
    except ValueError as e:
        raise UnsupportedConfig(f"the config gives an invalid model option: {e}") from None
    # The model's own layout decides widths, heads and pooling, and refuses a reversible block that changes
    # shape (the official code would fail on it too).
    try:
        specs = layer_layout(mvit_cfg, reversible=True)
    except ValueError as e:
        raise UnsupportedConfig(f"the official reversible model cannot run this config (MVIT.REV.BUFFER_LAYERS="
                                f"{buffers} are its transition_layers): {e}") from None

    pools = any(s.stride_q or s.kernel_q or s.stride_kv or s.kernel_kv for s in specs)
    vit_like = (patch_2d and not buffers and not pools and kernel == stride and padding == [0, 0]
                and not m["SEP_POS_EMBED"] and all(s.dim_out == specs[0].dim for s in specs)
                and len({s.num_heads for s in specs}) == 1 and kernel[0] == kernel[1] and crop % kernel[0] == 0)
    if vit_like:
        vit = dict(img_size=crop, patch_size=kernel[0], embed_dim=specs[0].dim, depth=len(specs),
                   num_heads=specs[0].num_heads)
        vit.update({k: kwargs[k] for k in ("num_classes", "in_chans", "mlp_ratio", "qkv_bias", "drop_rate",
                                           "drop_path_rate")})
        return ArchSpec("RevViT", vit, notes)
    return ArchSpec("RevMViT", kwargs, notes)
