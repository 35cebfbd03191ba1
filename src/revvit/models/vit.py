"""Rev-ViT: a plain ViT whose blocks are reversible two-stream blocks (Mangalam et al., CVPR 2022).

    image (B, C, H, W) -> patches + pos_embed (B, N, D) -> X1 = X2 = tokens
    -> reversible blocks, F = LN -> attention, G = LN -> MLP -> [Y1, Y2] (B, N, 2D)
    -> LayerNorm(2D) -> mean over tokens -> Linear(2D, classes)

No class token; logits out (the official head applies softmax in eval mode, this one never does). With
`dynamic_img_size=True` (timm's convention) any image size the patch size divides is taken, the position
embedding resampled (bicubic) from the `img_size` grid to the input's. An
official SlowFast Rev-ViT checkpoint loads through `checkpoint_filter_fn` (renames, and the split of a
fused qkv).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..layers import AttentionBranch, MlpBranch, PatchEmbed, TokenClassifierMixin, norm_streams, resample_pos_embed
from ..reversible import ReversibleBlock, ReversibleStack, join_streams, set_chunking
from ._common import (
    check_common_options,
    check_size,
    filter_official,
    init_weights_official,
    known_options,
    pretrained_cfg,
    rename_official_keys,
)

__all__ = ["RevViTConfig", "RevViT", "official_to_revvit", "checkpoint_filter_fn"]


@dataclass
class RevViTConfig:
    """The options of a Rev-ViT; an invalid value is refused at construction (ValueError naming it)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # linearly increasing over depth, one per-sample mask per block
    global_pool: str = "avg"
    dynamic_img_size: bool = False  # take any size patch_size divides; pos_embed resampled to its grid

    def __post_init__(self):
        check_common_options(self)
        self.patch_size = check_size("patch_size", self.patch_size)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={self.embed_dim} and "
                             f"num_heads={self.num_heads}")


class RevViT(TokenClassifierMixin, nn.Module):
    """Reversible Vision Transformer. Input (B, in_chans, img_size, img_size); output (B, num_classes)."""

    def __init__(self, cfg: Optional[RevViTConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or RevViTConfig(**known_options(RevViTConfig, kwargs))
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.embed_dim = cfg.embed_dim
        self.num_features = self.head_hidden_size = 2 * cfg.embed_dim

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                      dynamic_img_size=cfg.dynamic_img_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, cfg.embed_dim))
        rates = drop_path_schedule(cfg.drop_path_rate, cfg.depth)
        self.stack = ReversibleStack([
            ReversibleBlock(AttentionBranch(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias),
                            MlpBranch(cfg.embed_dim, cfg.mlp_ratio), drop_path=rate)
            for rate in rates
        ])
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=self.num_features, reduction=cfg.patch_size, module=f"stack.blocks.{i}")
                             for i in range(cfg.depth)]

        self.apply(init_weights_official)
        trunc_normal_(self.pos_embed, std=0.02)

    # -- timm's interface -------------------------------------------------------------------------
    def set_backprop(self, mode: str) -> "RevViT":
        """"reversible" (recompute activations in backward) or "autograd" (keep them: the reference)."""
        self.stack.set_backprop(mode)
        return self

    def set_chunking(self, chunk_bytes: Optional[int] = None, fused: bool = True) -> "RevViT":
        """How "reversible" backprop computes F and G (see `ReversibleStack.set_chunking`): `chunk_bytes`
        None automatic, 0 never split, or a budget in bytes for one piece; `fused` False: F and G
        recomputed under autograd instead of back-propagated in their own pass."""
        return set_chunking(self, chunk_bytes, fused)

    @property
    def backprop(self) -> str:
        return self.stack.backprop

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch (`train.py --grad-checkpointing`): recomputing activations in backward is what
        reversible backprop does, so True selects "reversible" and False "autograd"."""
        self.set_backprop("reversible" if enable else "autograd")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images -> tokens with position embeddings (resampled to the input's grid), and the grid."""
        grid = self.patch_embed.grid_of(x)
        x = self.patch_embed(x)
        return x + resample_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid), grid

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised two-stream tokens (B, N, 2D), attention stream first."""
        x, _ = self._embed(x)
        return self._final_norm(*self.stack(x, x))

    def _final_norm(self, y1: Tensor, y2: Tensor) -> Tensor:
        """norm(cat(Y1, Y2)) without keeping the concatenation (`norm_streams`); in "autograd" mode the
        plain expression (twice differentiable)."""
        return norm_streams(self.norm, y1, y2, lean=self.backprop != "autograd")

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Block outputs, timm's way: [Y1, Y2] of the blocks in `indices` (None: all; n: the last n) as
        (B, 2D, H/p, W/p) maps ("NLC": (B, N, 2D) tokens), and unless `intermediates_only`, first the final
        normalised tokens. The stack runs as consecutive reversible segments ending at the taken blocks,
        so reversible backprop still keeps only the segment outputs (which are returned anyway)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stack), indices)
        stop = max_index + 1 if (stop_early or intermediates_only) else len(self.stack)
        x1, (h, w) = self._embed(x)
        x2 = x1
        maps, start = [], 0
        for index in sorted(take):  # a segment ends at every taken block
            x1, x2 = self.stack(x1, x2, start, index + 1)
            start = index + 1
            y = join_streams(x1, x2)
            maps.append(self.norm(y) if norm else y)
        if start < stop:
            x1, x2 = self.stack(x1, x2, start, stop)
        if output_fmt == "NCHW":
            maps = [y.transpose(1, 2).reshape(y.shape[0], -1, h, w) for y in maps]
        if intermediates_only:
            return maps
        return self._final_norm(x1, x2), maps

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"backprop={self.backprop!r}"


def drop_path_schedule(rate: float, depth: int) -> list[float]:
    """Drop-path rates rising linearly from 0 at the first block to `rate` at the last."""
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [rate] * depth


# -- official checkpoints -------------------------------------------------------------------------

def _split_fused_qkv(key: str, value: Tensor, own: Mapping[str, Tensor]) -> Optional[dict]:
    """A fused official `F.attn.qkv` for our separate q, k, v: rows [0, C) are q, [C, 2C) k and [2C, 3C) v,
    the order the official attention reshapes them in."""
    if not key.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
        return None
    base, kind = key.rsplit(".qkv.", 1)
    parts = [f"{base}.{name}.{kind}" for name in ("q", "k", "v")]
    if not all(p in own for p in parts) or value.shape[0] % 3:
        return None
    return {p: chunk.clone() for p, chunk in zip(parts, value.chunk(3, dim=0))}


def official_to_revvit(state: Mapping[str, Tensor], model: RevViT,
                       skip_class_token: bool = False) -> tuple[dict[str, Tensor], list[str]]:
    """An official Rev-ViT state dict renamed to `model`'s keys (official layer i is `stack.blocks.i`), a
    fused qkv split into q, k, v. Returns (renamed, official keys with no place in `model`)."""
    layer_names = [f"stack.blocks.{i}" for i in range(len(model.stack))]
    return rename_official_keys(state, model, layer_names, skip_class_token=skip_class_token,
                                   reshape=_split_fused_qkv)


def checkpoint_filter_fn(state_dict: dict, model: RevViT) -> dict:
    """timm's pretrained hook: an official SlowFast Rev-ViT state dict (or whole `.pyth` dict) renamed to
    `model`'s keys; a state dict in our format passes through."""
    return filter_official(state_dict, model, official_to_revvit)


# -- registry -------------------------------------------------------------------------------------

default_cfgs = generate_default_cfgs({
    "rev_vit_tiny_patch16_224": pretrained_cfg(),
    "rev_vit_small_patch16_224": pretrained_cfg(paper_ids="arXiv:2302.04869",
                                                 notes=("ImageNet top-1 79.9 (paper)",)),
    "rev_vit_base_patch16_224": pretrained_cfg(paper_ids="arXiv:2302.04869",
                                                 notes=("ImageNet top-1 81.8 (paper)",)),
    "rev_vit_large_patch16_224": pretrained_cfg(paper_ids="arXiv:2302.04869",
                                                 notes=("ImageNet top-1 81.4 (paper)",)),
})


def _create(variant: str, pretrained: bool, **kwargs) -> RevViT:
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks unless told
    return build_model_with_cfg(RevViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def rev_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> RevViT:
    """Rev-ViT-Ti: D 192, 12 blocks, 3 heads."""
    args = dict(embed_dim=192, depth=12, num_heads=3)
    return _create("rev_vit_tiny_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def rev_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> RevViT:
    """Rev-ViT-S: D 384, 12 blocks, 6 heads, drop path 0.1 (22.4M params)."""
    args = dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1)
    return _create("rev_vit_small_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def rev_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> RevViT:
    """Rev-ViT-B: D 768, 12 blocks, 12 heads, drop path 0.2 (87.3M params)."""
    args = dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.2)
    return _create("rev_vit_base_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def rev_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> RevViT:
    """Rev-ViT-L: D 1024, 24 blocks, 16 heads (305M params)."""
    args = dict(embed_dim=1024, depth=24, num_heads=16)
    return _create("rev_vit_large_patch16_224", pretrained, **{**args, **kwargs})

