"""A second, module-based re-statement of the official SlowFast reversible MViT (eval math), for tests.

Written independently of revvit and of `official_format.py`: the module tree is laid out the way the
official builder lays it out (`slowfast/models/video_model_builder.py` class MViT with MVIT.REV.ENABLE,
`reversible_mvit.py`, `attention.py`, `common.py`), so its `state_dict()` has the official key names by
construction, and the per-layer arithmetic (widths, heads, Q/KV kernels and strides, token grids) is
derived here from the config with the official rules, not taken from revvit. A test can then build
this model from a YAML config, save its weights as an official `.pyth`, load that with
`revvit.load_slowfast` and compare logits and input gradients.

Only the eval-mode forward is re-stated (no drop path, no dropout); the head returns logits (the
official head's eval softmax is left out, as revvit returns logits).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import yaml
from torch import Tensor, nn

__all__ = ["DEFAULTS", "merged", "OfficialRevMViT"]

# The official defaults (slowfast/config/defaults.py) of the keys this re-statement reads.
DEFAULTS: dict[str, Any] = {
    "MODEL": {"NUM_CLASSES": 400},
    "DATA": {"NUM_FRAMES": 8, "TRAIN_CROP_SIZE": 224, "INPUT_CHANNEL_NUM": [3, 3]},
    "MVIT": {
        "PATCH_2D": False, "PATCH_KERNEL": [3, 7, 7], "PATCH_STRIDE": [2, 4, 4], "PATCH_PADDING": [2, 4, 4],
        "EMBED_DIM": 96, "NUM_HEADS": 1, "MLP_RATIO": 4.0, "QKV_BIAS": True, "DEPTH": 16,
        "DIM_MUL": [], "HEAD_MUL": [], "POOL_KV_STRIDE": [], "POOL_KV_STRIDE_ADAPTIVE": None,
        "POOL_Q_STRIDE": [], "POOL_KVQ_KERNEL": None, "SEP_POS_EMBED": False, "SEPARATE_QKV": False,
        "REV": {"RESPATH_FUSE": "concat", "BUFFER_LAYERS": [], "PRE_Q_FUSION": "avg"},
    },
}


def _literal(v: Any) -> Any:
    if isinstance(v, str) and v.startswith("("):  # "(3, 7, 7)" as in the official K400 yaml
        return list(yaml.safe_load("[" + v[1:-1] + "]"))
    return v


def merged(cfg_text: str) -> dict:
    """A YAML config merged over DEFAULTS (values of the YAML win), tuples written "(a, b)" decoded."""
    def merge(base: dict, over: Mapping) -> dict:
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else _literal(v)
        return out
    return merge(DEFAULTS, yaml.safe_load(cfg_text))


def _round(width: float, mult: float, divisor: int = 1) -> int:
    """Width times mult, to the nearest multiple of divisor (at least 1), bumped if below 90%."""
    w = width * mult
    out = max(1, int(w + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * w else out)


class _Attention(nn.Module):
    """MultiScaleAttention, mode "conv", pool after projection, no class token, no rel-pos."""

    def __init__(self, dim, dim_out, heads, qkv_bias, separate, kernel_q, stride_q, kernel_kv, stride_kv):
        super().__init__()
        self.heads, self.dim_out, self.hd = heads, dim_out, dim_out // heads
        if separate:
            self.q, self.k, self.v = (nn.Linear(dim, dim_out, bias=qkv_bias) for _ in range(3))
        else:
            self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        self.separate = separate
        self._pooling("q", kernel_q, stride_q)
        self._pooling("k", kernel_kv, stride_kv)
        self._pooling("v", kernel_kv, stride_kv)

    def _pooling(self, name, kernel, stride):
        kernel, stride = list(kernel), list(stride)
        prod_k = 1
        for v in kernel:
            prod_k *= v
        prod_s = 1
        for v in stride:
            prod_s *= v
        if prod_k == 1 and prod_s == 1:  # the official skip: kernel and stride all ones (or empty)
            setattr(self, f"pool_{name}", None)
            return
        setattr(self, f"pool_{name}", nn.Conv3d(self.hd, self.hd, kernel, stride=stride,
                                                padding=[k // 2 for k in kernel], groups=self.hd, bias=False))
        setattr(self, f"norm_{name}", nn.LayerNorm(self.hd, eps=1e-6))

    def pool(self, name: str, x: Tensor, thw) -> Tensor:
        """x (B, heads, L, hd) -> pooled (B, heads, L', hd)."""
        conv = getattr(self, f"pool_{name}")
        if conv is None:
            return x
        b, h, _, hd = x.shape
        y = conv(x.reshape(b * h, thw[0], thw[1], thw[2], hd).permute(0, 4, 1, 2, 3).contiguous())
        y = y.reshape(b, h, hd, -1).transpose(2, 3)
        return getattr(self, f"norm_{name}")(y)

    def forward(self, x: Tensor, thw) -> Tensor:
        b, n, _ = x.shape
        if self.separate:
            q, k, v = (getattr(self, s)(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3) for s in "qkv")
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = self.pool("q", q, thw), self.pool("k", k, thw), self.pool("v", v, thw)
        a = (q * self.hd ** -0.5) @ k.transpose(-2, -1)
        y = a.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, -1, self.dim_out))


class _FSub(nn.Module):  # official AttentionSubBlock: norm, attn; thw fixed at build time
    def __init__(self, dim, thw, **attn):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, **attn)
        self.thw = list(thw)

    def forward(self, x):
        return self.attn(self.norm(x), self.thw)


class _Mlp(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _GSub(nn.Module):  # official MLPSubblock
    def __init__(self, dim, ratio):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * ratio))

    def forward(self, x):
        return self.mlp(self.norm(x))


class _Fusion(nn.Module):  # official TwoStreamFusion on the concatenated (B, N, 2C) tensor
    def __init__(self, mode: str, dim: int):
        super().__init__()
        self.mode = mode
        if mode.startswith("concat_linear"):
            parts = mode.split("_")
            mult = float(parts[2]) if len(parts) >= 3 else 1.0
            self.fuse_fn = _Mlp(dim, int(dim * mult), dim)
        elif mode not in ("avg", "concat"):
            raise NotImplementedError(mode)

    def forward(self, x):
        if self.mode == "avg":
            a, b = torch.chunk(x, 2, dim=2)
            return torch.stack([a, b]).mean(dim=0)
        if self.mode == "concat":
            return x
        return self.fuse_fn(x) + x


class _RevBlock(nn.Module):
    def __init__(self, F_, G_):
        super().__init__()
        self.F, self.G = F_, G_

    def forward(self, x1, x2):
        y1 = x1 + self.F(x2)
        return y1, x2 + self.G(y1)


class _Transition(nn.Module):
    def __init__(self, dim, dim_out, fusion, ratio, F_):
        super().__init__()
        self.F = F_
        self.G = _GSub(dim_out, ratio)
        self.pre_q_fuse = _Fusion(fusion, dim)
        if dim != dim_out:
            self.res_proj = nn.Linear(dim, dim_out)

    def forward(self, x):
        x = self.pre_q_fuse(x)
        res = self.res_proj(x) if hasattr(self, "res_proj") else x
        b, n, c = res.shape
        heads = self.F.attn.heads
        res = self.F.attn.pool("q", res.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3), self.F.thw)
        res = res.permute(0, 2, 1, 3).reshape(b, res.shape[2], c)
        x = res + self.F(x)
        return x + self.G(x)


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()

    def forward(self, x):
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            if isinstance(layer, _Transition):
                x = layer(x)
                i += 1
                continue
            a, h = x, x  # a run restarts from two copies
            while i < len(self.layers) and isinstance(self.layers[i], _RevBlock):
                a, h = self.layers[i](a, h)
                i += 1
            x = torch.cat([a, h], dim=-1)
        return x


class _Head(nn.Module):
    def __init__(self, dim, classes):
        super().__init__()
        self.projection = nn.Linear(dim, classes)

    def forward(self, x):
        return self.projection(x)


class OfficialRevMViT(nn.Module):
    """The official reversible MViT (eval) for a merged config; `state_dict()` has the official keys."""

    def __init__(self, cfg: Mapping):
        super().__init__()
        m, rev, data = cfg["MVIT"], cfg["MVIT"]["REV"], cfg["DATA"]
        depth = int(m["DEPTH"])
        two_d = bool(m["PATCH_2D"])
        stride = ([1] if two_d else []) + [int(s) for s in m["PATCH_STRIDE"]]
        frames, crop = int(data["NUM_FRAMES"]), int(data["TRAIN_CROP_SIZE"])
        dims = [frames // stride[0], crop // stride[1], crop // stride[2]]
        self.patch_embed = nn.Module()
        conv = nn.Conv2d if two_d else nn.Conv3d
        self.patch_embed.proj = conv(int(data["INPUT_CHANNEL_NUM"][0]), int(m["EMBED_DIM"]), list(m["PATCH_KERNEL"]),
                                     stride=list(m["PATCH_STRIDE"]), padding=list(m["PATCH_PADDING"]))
        c0 = int(m["EMBED_DIM"])
        self.sep = bool(m["SEP_POS_EMBED"])
        if self.sep:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, dims[1] * dims[2], c0))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, dims[0], c0))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, dims[0] * dims[1] * dims[2], c0))
        self.patch_dims = dims

        # per-layer pooling, as the builder derives it
        kern = m["POOL_KVQ_KERNEL"]
        sq = [[] for _ in range(depth)]
        kq = [[] for _ in range(depth)]
        for e in m["POOL_Q_STRIDE"]:
            sq[e[0]] = list(e[1:])
            kq[e[0]] = list(kern) if kern is not None else [s + 1 if s > 1 else s for s in e[1:]]
        kv_list = m["POOL_KV_STRIDE"] or []
        if m["POOL_KV_STRIDE_ADAPTIVE"] is not None:
            cur = list(m["POOL_KV_STRIDE_ADAPTIVE"])
            kv_list = []
            for i in range(depth):
                if sq[i]:
                    cur = [max(c // s, 1) for c, s in zip(cur, sq[i])]
                kv_list.append([i] + cur)
        skv = [[] for _ in range(depth)]
        kkv = [[] for _ in range(depth)]
        for e in kv_list:
            skv[e[0]] = list(e[1:])
            kkv[e[0]] = list(kern) if kern is not None else [s + 1 if s > 1 else s for s in e[1:]]

        dim_mul, head_mul = [1.0] * (depth + 1), [1.0] * (depth + 1)
        for i, v in m["DIM_MUL"]:
            dim_mul[i] = v
        for i, v in m["HEAD_MUL"]:
            head_mul[i] = v
        fusion = rev["PRE_Q_FUSION"]
        buffers = list(rev["BUFFER_LAYERS"])
        self.rev_backbone = _Backbone()
        heads, embed, thw = int(m["NUM_HEADS"]), c0, list(dims)
        for i in range(depth):
            heads = _round(heads, head_mul[i])
            embed = _round(embed, dim_mul[i - 1] if i > 0 else 1.0, divisor=heads)
            dim_out = _round(embed, dim_mul[i], divisor=_round(heads, head_mul[i + 1]))
            attn = dict(heads=heads, qkv_bias=bool(m["QKV_BIAS"]), separate=bool(m["SEPARATE_QKV"]),
                        kernel_q=kq[i], stride_q=sq[i], kernel_kv=kkv[i], stride_kv=skv[i])
            if i in buffers:
                d_in = embed * (2 if "concat" in fusion else 1)  # concat fusions widen the input only
                layer = _Transition(d_in, dim_out, fusion, float(m["MLP_RATIO"]),
                                    _FSub(d_in, thw, dim_out=dim_out, **attn))
            else:
                layer = _RevBlock(_FSub(embed, thw, dim_out=dim_out, **attn), _GSub(embed, float(m["MLP_RATIO"])))
            self.rev_backbone.layers.append(layer)
            if sq[i]:
                thw = [t // s for t, s in zip(thw, sq[i])]
        final = _round(c0, float(torch.tensor([v for v in dim_mul]).prod()), divisor=int(m["NUM_HEADS"]))
        assert rev["RESPATH_FUSE"] == "concat"
        self.norm = nn.LayerNorm(2 * final, eps=1e-6)
        self.head = _Head(2 * final, int(cfg["MODEL"]["NUM_CLASSES"]))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t, h, w = self.patch_dims
        if self.sep:
            pos = self.pos_embed_spatial.repeat(1, t, 1) + torch.repeat_interleave(
                self.pos_embed_temporal, h * w, dim=1)
        else:
            pos = self.pos_embed
        x = self.rev_backbone(x + pos)
        return self.head(self.norm(x).mean(1))
