"""The training config embedded in a SlowFast checkpoint: parse it safely, merge it over the official
defaults, and read off the architecture it describes.

A SlowFast checkpoint stores its config as YAML text (the output of the config node's `dump()`); older
or hand-made files may hold a plain dict instead. Only the keys that decide the architecture of the
reversible models are kept here, with the defaults of `slowfast/config/defaults.py`: a YAML value
overrides the default, a key the YAML does not mention takes the default, exactly as SlowFast merges its
configs.
"""
from __future__ import annotations

import ast
import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

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


def _round_width(width: float, multiplier: float, divisor: int = 1) -> int:
    """SlowFast's width rounding: width*multiplier to the nearest multiple of divisor (at least 1, the
    official `min_width`), never below 90%."""
    if not multiplier:
        return int(width)
    width = width * multiplier
    out = max(1, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


def _seq(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UnsupportedConfig(f"{name} must be a list, got {value!r}")


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
        need(fusion == "avg" or _concat_linear_mult(fusion) is not None, "MVIT.REV.PRE_Q_FUSION",
             fusion, "'avg' or 'concat_linear[_<mult>[_<dropout>]]'")
    return problems


def _concat_linear_mult(mode: Any) -> float | None:
    """The hidden multiplier of a 'concat_linear[_<mult>]' fusion (no dropout part, no 'ln+'), else None."""
    if not isinstance(mode, str) or not mode.startswith("concat_linear"):
        return None
    parts = mode.split("_")
    try:
        if len(parts) == 2:
            return 1.0
        if len(parts) == 3:
            return float(parts[2])
        if len(parts) == 4:  # concat_linear_<mult>_<droprate>: dropout only matters in training
            float(parts[3])
            return float(parts[2])
    except ValueError:
        return None
    return None


def _layer_table(c: Mapping) -> dict:
    """Per-layer Q/KV kernels and strides, dims and heads, as SlowFast's MViT builder derives them."""
    m = c["MVIT"]
    depth = int(m["DEPTH"])
    dim_mul, head_mul = [1.0] * (depth + 1), [1.0] * (depth + 1)
    for i, mul in _seq(m["DIM_MUL"], "MVIT.DIM_MUL"):
        dim_mul[int(i)] = float(mul)
    for i, mul in _seq(m["HEAD_MUL"], "MVIT.HEAD_MUL"):
        head_mul[int(i)] = float(mul)
    kernel = m["POOL_KVQ_KERNEL"]
    stride_q: list[list[int]] = [[] for _ in range(depth)]
    kernel_q: list[list[int]] = [[] for _ in range(depth)]
    for entry in _seq(m["POOL_Q_STRIDE"], "MVIT.POOL_Q_STRIDE"):
        i, s = int(entry[0]), [int(v) for v in entry[1:]]
        stride_q[i] = s
        kernel_q[i] = list(kernel) if kernel is not None else [v + 1 if v > 1 else v for v in s]
    kv_entries = _seq(m["POOL_KV_STRIDE"], "MVIT.POOL_KV_STRIDE")
    if m["POOL_KV_STRIDE_ADAPTIVE"] is not None:
        current = [int(v) for v in m["POOL_KV_STRIDE_ADAPTIVE"]]
        kv_entries = []
        for i in range(depth):
            if stride_q[i]:
                current = [max(s // q, 1) for s, q in zip(current, stride_q[i])]
            kv_entries.append([i] + current)
    stride_kv: list[list[int]] = [[] for _ in range(depth)]
    kernel_kv: list[list[int]] = [[] for _ in range(depth)]
    for entry in kv_entries:
        i, s = int(entry[0]), [int(v) for v in entry[1:]]
        stride_kv[i] = s
        kernel_kv[i] = list(kernel) if kernel is not None else [v + 1 if v > 1 else v for v in s]

    embed, heads = int(m["EMBED_DIM"]), int(m["NUM_HEADS"])
    dims_in, dims_out, layer_heads = [], [], []
    for i in range(depth):
        heads = _round_width(heads, head_mul[i])
        embed = _round_width(embed, dim_mul[i - 1] if i > 0 else 1.0, divisor=heads)
        out = _round_width(embed, dim_mul[i], divisor=_round_width(heads, head_mul[i + 1]))
        dims_in.append(embed)
        dims_out.append(out)
        layer_heads.append(heads)
    return dict(depth=depth, dims_in=dims_in, dims_out=dims_out, heads=layer_heads, kernel_q=kernel_q,
                stride_q=stride_q, kernel_kv=kernel_kv, stride_kv=stride_kv, dim_mul=dim_mul)


def _pools(kernel: list[int], stride: list[int]) -> bool:
    """Whether the official attention builds a pooling for this kernel/stride (skipped when both are 1s)."""
    prod_k = 1
    for v in kernel:
        prod_k *= v
    prod_s = 1
    for v in stride:
        prod_s *= v
    return not (prod_k == 1 and prod_s == 1)


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
    if float(m["DROPOUT_RATE"]) > 0:
        notes.append(f"MVIT.DROPOUT_RATE={m['DROPOUT_RATE']} (training-time dropout in the official backbone) "
                     "is not reproduced; evaluation is unaffected")
    if int(data.get("TEST_CROP_SIZE", data["TRAIN_CROP_SIZE"])) != int(data["TRAIN_CROP_SIZE"]):
        notes.append(f"DATA.TEST_CROP_SIZE={data['TEST_CROP_SIZE']} differs from DATA.TRAIN_CROP_SIZE="
                     f"{data['TRAIN_CROP_SIZE']}; the model is built for the training crop, as the official MViT")
    t = _layer_table(c)
    depth = t["depth"]
    buffers = sorted(int(i) for i in _seq(rev["BUFFER_LAYERS"], "MVIT.REV.BUFFER_LAYERS"))
    bad = [i for i in buffers if not 0 <= i < depth]
    if bad:
        raise UnsupportedConfig(f"MVIT.REV.BUFFER_LAYERS {bad} are outside the {depth} layers")
    # A reversible block must keep its width and its token count; the official code would fail otherwise.
    for i in range(depth):
        if i in buffers:
            continue
        if t["dims_out"][i] != t["dims_in"][i] or (t["stride_q"][i] and _pools([1], t["stride_q"][i])):
            raise UnsupportedConfig(
                f"layer {i} changes the width or Q-pools but is not in MVIT.REV.BUFFER_LAYERS {buffers}: "
                "the official reversible model cannot run this config")

    in_chans = int(_seq(data["INPUT_CHANNEL_NUM"], "DATA.INPUT_CHANNEL_NUM")[0])
    crop = int(data["TRAIN_CROP_SIZE"])
    frames = int(data["NUM_FRAMES"])
    patch_2d = bool(m["PATCH_2D"])
    kernel = [int(v) for v in m["PATCH_KERNEL"]]
    stride = [int(v) for v in m["PATCH_STRIDE"]]
    padding = [int(v) for v in m["PATCH_PADDING"]]
    n = 2 if patch_2d else 3
    if not (len(kernel) == len(stride) == len(padding) == n):
        raise UnsupportedConfig(f"MVIT.PATCH_KERNEL/STRIDE/PADDING {kernel}/{stride}/{padding} must have {n} "
                                f"values with MVIT.PATCH_2D={patch_2d}")
    if patch_2d and frames != 1:
        raise UnsupportedConfig(f"MVIT.PATCH_2D=True needs DATA.NUM_FRAMES=1 (the official position embedding "
                                f"covers NUM_FRAMES grids), got {frames}")

    any_pool = any(_pools(t["kernel_q"][i], t["stride_q"][i]) if t["kernel_q"][i] or t["stride_q"][i] else False
                   for i in range(depth))
    any_pool = any_pool or any(_pools(t["kernel_kv"][i], t["stride_kv"][i])
                               for i in range(depth) if t["kernel_kv"][i] or t["stride_kv"][i])
    vit_like = (patch_2d and not buffers and not any_pool and kernel == stride and padding == [0, 0]
                and not m["SEP_POS_EMBED"] and all(d == t["dims_in"][0] for d in t["dims_out"])
                and len(set(t["heads"])) == 1 and kernel[0] == kernel[1] and crop % kernel[0] == 0)
    common = dict(num_classes=int(model["NUM_CLASSES"]), in_chans=in_chans, mlp_ratio=float(m["MLP_RATIO"]),
                  qkv_bias=bool(m["QKV_BIAS"]), drop_rate=float(model["DROPOUT_RATE"]),
                  drop_path_rate=float(m["DROPPATH_RATE"]))
    if vit_like:
        kwargs = dict(img_size=crop, patch_size=kernel[0], embed_dim=t["dims_in"][0], depth=depth,
                      num_heads=t["heads"][0], **common)
        return ArchSpec("RevViT", kwargs, notes)

    fusion = rev["PRE_Q_FUSION"]
    mult = _concat_linear_mult(fusion)
    if mult is not None:  # "concat_linear_<m>_<drop>": the dropout acts in training only
        if len(fusion.split("_")) == 4 and float(fusion.split("_")[3]) > 0:
            notes.append(f"MVIT.REV.PRE_Q_FUSION={fusion!r}: its training-time dropout is not reproduced")
        fusion = f"concat_linear_{mult:g}"
    if not buffers:
        fusion = "avg"  # no transition: the fusion is never used (Rev-ViT configs say "concat")

    def pairs(key: str) -> tuple:
        return tuple(tuple(entry) for entry in _seq(m[key], f"MVIT.{key}"))

    def opt(key: str) -> Optional[tuple]:
        return None if m[key] is None else tuple(int(v) for v in m[key])

    kwargs = dict(
        img_size=crop, num_frames=frames, patch_2d=patch_2d, patch_kernel=tuple(kernel),
        patch_stride=tuple(stride), patch_padding=tuple(padding), embed_dim=int(m["EMBED_DIM"]), depth=depth,
        num_heads=int(m["NUM_HEADS"]), dim_mul=pairs("DIM_MUL"), head_mul=pairs("HEAD_MUL"),
        pool_q_stride=pairs("POOL_Q_STRIDE"), pool_kvq_kernel=opt("POOL_KVQ_KERNEL"),
        pool_kv_stride=pairs("POOL_KV_STRIDE"), pool_kv_stride_adaptive=opt("POOL_KV_STRIDE_ADAPTIVE"),
        separate_qkv=bool(m["SEPARATE_QKV"]), sep_pos_embed=bool(m["SEP_POS_EMBED"]),
        transition_layers=tuple(buffers), pre_q_fusion=fusion, **common)
    return ArchSpec("RevMViT", kwargs, notes)
