"""Official SlowFast checkpoints made from revvit models of known weights, and an independent forward.

    ckpt = official_checkpoint(model)                  # {"model_state", "cfg" (YAML), "epoch", ...}
    path = write_pyth(tmp_path / "m.pyth", model)      # torch.save of that dict
    logits = official_forward(ckpt["model_state"], merged_cfg, x)

`official_state_dict` is the inverse of the loader's mapping, written from the official key names
(REFERENCE.md section 4), not from the loader. `official_forward` is a functional transcription of the
official eval-mode forward (patch embed, position embeddings, reversible runs on [X1, X2], stage
transitions, norm -> mean -> projection; logits before the softmax) reading only official keys, so a
test can compare a loaded model with the official math without the official code.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

__all__ = ["official_state_dict", "official_cfg", "official_checkpoint", "write_pyth", "official_forward"]


# -- revvit model -> official names ---------------------------------------------------------------

def _layer_part(rest: str) -> str:
    for ours, theirs in (("f.", "F."), ("g.", "G."), ("fuse.mlp.", "pre_q_fuse.fuse_fn."), ("res_proj.", "res_proj.")):
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def official_state_dict(model, fused_qkv: bool = False) -> dict[str, Tensor]:
    """`model`'s weights under the official names. `fused_qkv` writes one F.attn.qkv (q|k|v rows) for a
    model with separate q, k, v (the Kinetics layout)."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if hasattr(model, "stack"):  # Rev-ViT: stack.blocks.{i}
        prefixes = {f"stack.blocks.{i}.": i for i in range(len(model.stack))}
    else:  # Rev-MViT: the model names the module of each official layer
        prefixes = {name + ".": i for i, name in enumerate(model.layer_names)}
    out = {}
    for key, value in ours.items():
        layer = [p for p in prefixes if key.startswith(p)]
        if layer:
            prefix = max(layer, key=len)
            out[f"rev_backbone.layers.{prefixes[prefix]}.{_layer_part(key[len(prefix):])}"] = value
        elif key.startswith("head."):
            out["head.projection." + key[len("head."):]] = value
        else:  # patch_embed.proj.*, pos_embed*, norm.*
            out[key] = value
    if fused_qkv:
        for key in [k for k in out if k.endswith(".F.attn.q.weight") or k.endswith(".F.attn.q.bias")]:
            base, kind = key.rsplit(".q.", 1)
            out[f"{base}.qkv.{kind}"] = torch.cat([out.pop(f"{base}.{n}.{kind}") for n in ("q", "k", "v")])
    return out


def _crop_size(img_size) -> int:
    """The official crop size (one int: SlowFast crops are square) of a model's img_size, an int or an (H, W)
    pair (timm passes its pretrained cfg's (224, 224) to a model created without img_size=...)."""
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    if h != w:
        raise ValueError(f"an official config holds one square crop size; the model has img_size={img_size}")
    return int(h)


def official_cfg(model, fused_qkv: bool = False, **extra: Any) -> dict:
    """The SlowFast config (as a nested dict of official keys) of `model`'s architecture."""
    c = model.cfg
    crop = _crop_size(c.img_size)
    cfg: dict[str, Any] = {
        "MODEL": {"MODEL_NAME": "MViT", "ARCH": "mvit", "NUM_CLASSES": model.num_classes,
                  "DROPOUT_RATE": c.drop_rate, "LOSS_FUNC": "soft_cross_entropy"},
        "DATA": {"TRAIN_CROP_SIZE": crop, "TEST_CROP_SIZE": crop, "INPUT_CHANNEL_NUM": [c.in_chans]},
        "MVIT": {"MODE": "conv", "CLS_EMBED_ON": False, "EMBED_DIM": c.embed_dim, "NUM_HEADS": c.num_heads,
                 "MLP_RATIO": c.mlp_ratio, "QKV_BIAS": c.qkv_bias, "DROPPATH_RATE": c.drop_path_rate,
                 "DEPTH": c.depth, "NORM": "layernorm", "ZERO_DECAY_POS_CLS": False,
                 "REV": {"ENABLE": True, "RESPATH_FUSE": "concat", "RES_PATH": "conv"}},
        "SOLVER": {"BASE_LR": 0.0005, "OPTIMIZING_METHOD": "adamw"},
        "NUM_GPUS": 8,
    }
    m = cfg["MVIT"]
    if hasattr(model, "stack"):
        cfg["DATA"]["NUM_FRAMES"] = 1
        m.update(PATCH_2D=True, PATCH_KERNEL=[c.patch_size] * 2, PATCH_STRIDE=[c.patch_size] * 2,
                 PATCH_PADDING=[0, 0], POOL_KV_STRIDE=[], SEPARATE_QKV=not fused_qkv)
        m["REV"]["PRE_Q_FUSION"] = "concat"
    else:
        cfg["DATA"]["NUM_FRAMES"] = c.num_frames
        m.update(PATCH_2D=c.patch_2d, PATCH_KERNEL=list(c.patch_kernel), PATCH_STRIDE=list(c.patch_stride),
                 PATCH_PADDING=list(c.patch_padding), DIM_MUL=[list(x) for x in c.dim_mul],
                 HEAD_MUL=[list(x) for x in c.head_mul], POOL_Q_STRIDE=[list(x) for x in c.pool_q_stride],
                 SEP_POS_EMBED=c.sep_pos_embed, SEPARATE_QKV=c.separate_qkv and not fused_qkv)
        if c.pool_kvq_kernel is not None:
            m["POOL_KVQ_KERNEL"] = list(c.pool_kvq_kernel)
        if c.pool_kv_stride_adaptive is not None:
            m["POOL_KV_STRIDE_ADAPTIVE"] = list(c.pool_kv_stride_adaptive)
        else:
            m["POOL_KV_STRIDE"] = [list(x) for x in c.pool_kv_stride]
        m["REV"]["BUFFER_LAYERS"] = [s.index for s in model.specs if s.transition]
        m["REV"]["PRE_Q_FUSION"] = c.pre_q_fusion
    for dotted, value in extra.items():  # e.g. {"MVIT.CLS_EMBED_ON": True}
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def official_checkpoint(model, fused_qkv: bool = False, prefix: str = "", cfg_as: str = "yaml",
                        **extra: Any) -> dict:
    """The dict an official `.pyth` holds. cfg_as: "yaml" (safe_dump text, as SlowFast writes it),
    "yaml_tuples" (tuples tagged !!python/tuple), or "dict"."""
    cfg = official_cfg(model, fused_qkv, **extra)
    if cfg_as == "yaml":
        cfg_entry: Any = yaml.safe_dump(cfg)
    elif cfg_as == "yaml_tuples":
        m = cfg["MVIT"]
        for key in ("PATCH_KERNEL", "PATCH_STRIDE", "PATCH_PADDING"):
            m[key] = tuple(m[key])
        cfg_entry = yaml.dump(cfg)
    else:
        cfg_entry = cfg
    state = {prefix + k: v for k, v in official_state_dict(model, fused_qkv).items()}
    return {"epoch": 300, "model_state": state, "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-6}]},
            "cfg": cfg_entry}


def write_pyth(path: str | Path, model=None, ckpt: Optional[dict] = None, **kwargs: Any) -> Path:
    """torch.save an official-format checkpoint of `model` (or the given dict) to `path`."""
    path = Path(path)
    torch.save(ckpt if ckpt is not None else official_checkpoint(model, **kwargs), path)
    return path


# -- the official eval-mode forward, functionally, from official keys ------------------------------

def _ln(x: Tensor, sd: dict, name: str, eps: float = 1e-6) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x: Tensor, sd: dict, name: str) -> Tensor:
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _mlp(x: Tensor, sd: dict, name: str) -> Tensor:
    return _lin(F.gelu(_lin(x, sd, name + ".fc1")), sd, name + ".fc2")


def _pool(x: Tensor, sd: dict, name: str, norm: str, thw, kernel, stride):
    """(B, heads, L, hd) pooled on the thw grid by the depthwise conv `name`, then LayerNorm `norm`."""
    if not kernel or (math.prod(kernel) == 1 and math.prod(stride) == 1):
        return x, list(thw)
    b, h, _, hd = x.shape
    x = x.reshape(b * h, *thw, hd).permute(0, 4, 1, 2, 3)
    x = F.conv3d(x, sd[name + ".weight"], None, stride, [k // 2 for k in kernel], 1, hd)
    thw = list(x.shape[2:])
    x = x.reshape(b, h, hd, -1).transpose(2, 3)
    return _ln(x, sd, norm), thw


def _attention(x: Tensor, sd: dict, p: str, thw, dim_out: int, heads: int, t: dict, i: int):
    b, n, _ = x.shape
    if p + ".qkv.weight" in sd:
        qkv = _lin(x, sd, p + ".qkv").reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = (_lin(x, sd, f"{p}.{s}").reshape(b, n, heads, -1).permute(0, 2, 1, 3) for s in "qkv")
    q, q_thw = _pool(q, sd, p + ".pool_q", p + ".norm_q", thw, t["kernel_q"][i], t["stride_q"][i])
    k, _ = _pool(k, sd, p + ".pool_k", p + ".norm_k", thw, t["kernel_kv"][i], t["stride_kv"][i])
    v, _ = _pool(v, sd, p + ".pool_v", p + ".norm_v", thw, t["kernel_kv"][i], t["stride_kv"][i])
    attn = ((q * (dim_out // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, -1, dim_out)
    return _lin(x, sd, p + ".proj"), q_thw


def _round_width(width: float, multiplier: float, divisor: int = 1) -> int:
    """SlowFast's width rounding: width*multiplier to the nearest multiple of divisor (at least 1), never
    below 90%."""
    if not multiplier:
        return int(width)
    width = width * multiplier
    out = max(1, int(width + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * width else out)


def _layer_table(c: dict) -> dict:
    """Per-layer Q/KV kernels and strides, dims and heads, as SlowFast's MViT builder derives them from a
    merged config (transcribed from the official builder, independently of revvit's layout code)."""
    m = c["MVIT"]
    depth = int(m["DEPTH"])
    dim_mul, head_mul = [1.0] * (depth + 1), [1.0] * (depth + 1)
    for i, mul in m["DIM_MUL"] or []:
        dim_mul[int(i)] = float(mul)
    for i, mul in m["HEAD_MUL"] or []:
        head_mul[int(i)] = float(mul)
    kernel = m["POOL_KVQ_KERNEL"]

    def kernel_for(stride):
        return list(kernel) if kernel is not None else [v + 1 if v > 1 else v for v in stride]

    stride_q, kernel_q = [[] for _ in range(depth)], [[] for _ in range(depth)]
    for entry in m["POOL_Q_STRIDE"] or []:
        i, stride = int(entry[0]), [int(v) for v in entry[1:]]
        stride_q[i], kernel_q[i] = stride, kernel_for(stride)
    kv_entries = m["POOL_KV_STRIDE"] or []
    if m["POOL_KV_STRIDE_ADAPTIVE"] is not None:
        current, kv_entries = [int(v) for v in m["POOL_KV_STRIDE_ADAPTIVE"]], []
        for i in range(depth):
            if stride_q[i]:
                current = [max(s // q, 1) for s, q in zip(current, stride_q[i])]
            kv_entries.append([i] + current)
    stride_kv, kernel_kv = [[] for _ in range(depth)], [[] for _ in range(depth)]
    for entry in kv_entries:
        i, stride = int(entry[0]), [int(v) for v in entry[1:]]
        stride_kv[i], kernel_kv[i] = stride, kernel_for(stride)

    embed, heads = int(m["EMBED_DIM"]), int(m["NUM_HEADS"])
    dims_out, layer_heads = [], []
    for i in range(depth):
        heads = _round_width(heads, head_mul[i])
        embed = _round_width(embed, dim_mul[i - 1] if i > 0 else 1.0, divisor=heads)
        dims_out.append(_round_width(embed, dim_mul[i], divisor=_round_width(heads, head_mul[i + 1])))
        layer_heads.append(heads)
    return dict(depth=depth, dims_out=dims_out, heads=layer_heads, kernel_q=kernel_q, stride_q=stride_q,
                kernel_kv=kernel_kv, stride_kv=stride_kv)


def official_forward(sd: dict, cfg: dict, x: Tensor) -> Tensor:
    """Logits of the official MViT (REV.ENABLE) in eval mode for a merged config (see merge_defaults)."""
    m, rev = cfg["MVIT"], cfg["MVIT"]["REV"]
    t = _layer_table(cfg)
    conv = F.conv2d if m["PATCH_2D"] else F.conv3d
    y = conv(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], m["PATCH_STRIDE"], m["PATCH_PADDING"])
    thw = [1, *y.shape[2:]] if m["PATCH_2D"] else list(y.shape[2:])
    x = y.flatten(2).transpose(1, 2)
    if m["SEP_POS_EMBED"]:
        pos = sd["pos_embed_spatial"].repeat(1, thw[0], 1) + torch.repeat_interleave(
            sd["pos_embed_temporal"], thw[1] * thw[2], dim=1)
        x = x + pos
    else:
        x = x + sd["pos_embed"]
    buffers = set(rev["BUFFER_LAYERS"])
    fusion = rev["PRE_Q_FUSION"]
    i, depth = 0, t["depth"]
    while i < depth:
        p = f"rev_backbone.layers.{i}"
        if i in buffers:  # stage transition on the concatenated streams
            if fusion == "avg":
                x = torch.stack(torch.chunk(x, 2, dim=2)).mean(dim=0)
            elif fusion.startswith("concat_linear"):
                x = _mlp(x, sd, p + ".pre_q_fuse.fuse_fn") + x
            heads, dim_out = t["heads"][i], t["dims_out"][i]
            res = _lin(x, sd, p + ".res_proj") if p + ".res_proj.weight" in sd else x
            n_, l_, c_ = res.shape
            res = res.reshape(n_, l_, heads, c_ // heads).permute(0, 2, 1, 3)
            res, _ = _pool(res, sd, p + ".F.attn.pool_q", p + ".F.attn.norm_q", thw, t["kernel_q"][i], t["stride_q"][i])
            res = res.permute(0, 2, 1, 3).reshape(n_, res.shape[2], c_)
            a, new_thw = _attention(_ln(x, sd, p + ".F.norm"), sd, p + ".F.attn", thw, dim_out, heads, t, i)
            x = res + a
            x = x + _mlp(_ln(x, sd, p + ".G.norm"), sd, p + ".G.mlp")
            thw = new_thw
            i += 1
        else:  # a run of reversible blocks on X1 = X2 = x
            x1 = x2 = x
            while i < depth and i not in buffers:
                p = f"rev_backbone.layers.{i}"
                f, _ = _attention(_ln(x2, sd, p + ".F.norm"), sd, p + ".F.attn", thw, t["dims_out"][i],
                                  t["heads"][i], t, i)
                x1 = x1 + f
                x2 = x2 + _mlp(_ln(x1, sd, p + ".G.norm"), sd, p + ".G.mlp")
                i += 1
            x = torch.cat([x1, x2], dim=-1)
    x = _ln(x, sd, "norm").mean(1)
    return _lin(x, sd, "head.projection")
