"""Rev-MViT (Mangalam et al., CVPR 2022) and its non-reversible twin MViT, for images and video.

    input (B, C, [T,] H, W) -> conv patch embed + position embedding -> tokens (B, N, C0) on grid (T, H, W)
    Rev-MViT: per run of reversible blocks X1 = X2 = x; F = LN -> pooling attention (K/V pooled, Q not),
              G = LN -> MLP; between runs a stage-transition block fuses the two streams and does the
              width change and Q pooling with an ordinary residual; head LN([Y1, Y2]) -> mean -> Linear
    MViT:     the same layers as pre-norm residual blocks on one stream; head LN(x) -> mean -> Linear

One config describes both (`MViTConfig`); `layer_layout` (in `mvit_layout`) turns it into one `LayerSpec`
per layer, and the models here build their modules from those specs. With `dynamic_img_size=True` any
input size the strides divide is taken: the position embeddings are resampled to the input's grid and
every layer pools on the grid `layer_layout` gives for that input (the specs of each input grid are
cached; the modules do not change). The transition's residual path
follows the official release, and an official checkpoint loads through `checkpoint_filter_fn` (renames
only).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Mapping, Optional, Sequence, Union

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import (
    Grid,
    MlpBranch,
    PatchEmbed3d,
    PoolingAttentionBranch,
    TokenClassifierMixin,
    norm_streams,
    resample_pos_embed,
)
from ..reversible import BACKPROP_MODES, ReversibleBlock, ReversibleStack, join_streams, set_chunking
from ._common import filter_official, init_weights_official, known_options, pretrained_cfg, rename_official_keys
from .mvit_blocks import GridBlock, MViTBlock, StageTransition, StreamFusion, attention_options
from .mvit_layout import LayerSpec, MViTConfig, layer_layout

__all__ = ["MViTConfig", "LayerSpec", "layer_layout", "RevMViT", "MViT", "StageTransition", "StreamFusion",
           "GridBlock", "MViTBlock", "official_to_revvit", "checkpoint_filter_fn"]


# -- models ---------------------------------------------------------------------------------------

class _MultiscaleBase(TokenClassifierMixin, nn.Module):
    """What Rev-MViT and MViT share: stem, position embeddings, head, timm's interface."""

    cfg: MViTConfig
    specs: list[LayerSpec]

    def _init_stem(self, cfg: Optional[MViTConfig], kwargs: dict) -> Grid:
        if cfg is not None and kwargs:
            raise TypeError(f"pass either cfg or keyword options, not both (got {sorted(kwargs)})")
        self.cfg = cfg = cfg or MViTConfig(**known_options(MViTConfig, kwargs))
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.patch_embed = PatchEmbed3d(cfg.img_size, cfg.num_frames, cfg.in_chans, cfg.embed_dim, cfg.patch_kernel,
                                        cfg.patch_stride, cfg.patch_padding, conv_2d=cfg.patch_2d,
                                        dynamic_img_size=cfg.dynamic_img_size)
        self._layouts: dict[Grid, list[LayerSpec]] = {}  # specs per input grid other than the built one
        t, h, w = grid = self.patch_embed.grid_size
        if cfg.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, cfg.embed_dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, cfg.embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, t * h * w, cfg.embed_dim))
        return grid

    def _init_head(self, streams: int, feature_modules: list[str]) -> None:
        """streams: 2 where features are the two streams concatenated; feature_modules: the name of the module
        whose output is each stage's feature map."""
        self.num_features = self.head_hidden_size = num_features = streams * self.specs[-1].dim_out
        self.norm = nn.LayerNorm(num_features, eps=1e-6)
        self.head_drop = nn.Dropout(self.cfg.drop_rate)
        self.head = nn.Linear(num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.apply(init_weights_official)
        for p in sorted(self.no_weight_decay()):  # a set: sorted, so the draws do not depend on hashing
            trunc_normal_(getattr(self, p), std=0.02)
        stride = self.patch_embed.stride[1]
        self.feature_info = []
        for spec, module in zip(self._stage_ends(), feature_modules, strict=True):
            self.feature_info.append(dict(num_chs=streams * spec.dim_out, module=module,
                                          reduction=stride * self.specs[0].grid[1] // spec.grid_out[1]))

    def _stage_ends(self) -> list[LayerSpec]:
        """The last layer of each stage, whose output is the stage's feature map."""
        return [s for s in self.specs if s.stage_end]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed_spatial", "pos_embed_temporal"} if self.cfg.sep_pos_embed else {"pos_embed"}

    def layout_for(self, grid: Grid) -> list[LayerSpec]:
        """The layer specs on input token grid `grid` (the built ones at the construction-time grid)."""
        grid = tuple(grid)
        if grid == self.specs[0].grid:
            return self.specs
        if grid not in self._layouts:
            reduction = self.feature_info[-1]["reduction"] // self.patch_embed.stride[1]
            if grid[1] % reduction or grid[2] % reduction:
                size = f"{grid[1] * self.patch_embed.stride[1]}x{grid[2] * self.patch_embed.stride[2]}"
                raise ValueError(f"input of about {size} gives a {grid[1]}x{grid[2]} token grid, which the model's "
                                 f"Q strides ({reduction}) do not divide: give image sides divisible by "
                                 f"{self.feature_info[-1]['reduction']}")
            self._layouts[grid] = layer_layout(self.cfg, grid, reversible=isinstance(self, RevMViT))
        return self._layouts[grid]

    def _embed(self, x: Tensor) -> tuple[Tensor, list[LayerSpec]]:
        """Input -> tokens with position embeddings (resampled to the input's grid), and the layer specs."""
        x, (t, h, w) = self.patch_embed(x)
        specs = self.layout_for((t, h, w))
        t0, h0, w0 = self.specs[0].grid
        if self.cfg.sep_pos_embed:  # token t*HW + s gets spatial[s] + temporal[t]
            spatial = resample_pos_embed(self.pos_embed_spatial, (h0, w0), (h, w))
            temporal = resample_pos_embed(self.pos_embed_temporal, (t0, 1, 1), (t, 1, 1))
            return x + spatial.repeat(1, t, 1) + temporal.repeat_interleave(h * w, dim=1), specs
        return x + resample_pos_embed(self.pos_embed, (t0, h0, w0), (t, h, w)), specs

    def _run(self, x: Tensor, specs: list[LayerSpec], take: Sequence[int] = (),
             stop: Optional[int] = None) -> tuple[Tensor, dict[int, Tensor]]:
        """Tokens after the stem and their layer specs -> (final tokens, {level: that stage's output tokens}
        for levels in take). The final tokens are in the form `_final` takes."""
        raise NotImplementedError

    def _final(self, x, norm: bool = True) -> Tensor:
        """The final tokens `_run` returned as (B, N_last, num_features), through the final norm if `norm`."""
        return self.norm(x) if norm else x

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, [T,] H, W) -> normalised tokens (B, N_last, num_features)."""
        return self._final(self._run(*self._embed(x))[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, list[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Per-stage feature maps, timm's way.

        Returns a list of (B, C_k, [T_k,] H_k, W_k) maps (4-D for image input, 5-D for clips; "NLC": the
        (B, N_k, C_k) tokens) for the stages in `indices` (None: all; int n: the last n), and unless
        `intermediates_only`, first the final normalised tokens. `norm` normalises the last stage's map
        with the final norm.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        image = x.ndim == 4
        last = len(self.feature_info) - 1
        stop = max_index if (stop_early or intermediates_only) and max_index < last else None
        x, specs = self._embed(x)
        x, maps = self._run(x, specs, take, stop=stop)
        ends = [s for s in specs if s.stage_end]
        out = []
        for level in take:
            y = self.norm(maps[level]) if norm and level == last else maps[level]
            if output_fmt == "NCHW":
                b, n, c = y.shape
                t, h, w = ends[level].grid_out
                y = y.transpose(1, 2).reshape(b, c, t, h, w)
                if image and t == 1:
                    y = y.squeeze(2)
            out.append(y)
        if intermediates_only:
            return out
        return self._final(x, norm=stop is None), out

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep what the requested feature levels need; drop the head (and the final norm if asked)."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


class RevMViT(_MultiscaleBase):
    """Reversible multiscale vision transformer. Input (B, C, H, W) or (B, C, T, H, W); output (B, classes).

    `stages` alternates ReversibleStack runs and StageTransition blocks; `layer_names[i]` is the module
    of the official layer i (for checkpoint conversion). Feature maps are the two streams of each
    stage's last run, concatenated: 2C channels.
    """

    def __init__(self, cfg: Optional[MViTConfig] = None, **kwargs):
        super().__init__()
        grid = self._init_stem(cfg, kwargs)
        cfg = self.cfg
        self.specs = layer_layout(cfg, grid, reversible=True)

        stages: list[nn.Module] = []
        self.layer_names: list[str] = []
        feature_modules: list[str] = []
        run: list[ReversibleBlock] = []
        for spec in self.specs:
            if spec.transition:
                stages.append(ReversibleStack(run))
                run = []
                self.layer_names.append(f"stages.{len(stages)}")
                stages.append(StageTransition(spec, cfg))
            else:  # the run being collected becomes stages[len(stages)]
                self.layer_names.append(f"stages.{len(stages)}.blocks.{len(run)}")
                f = PoolingAttentionBranch(spec.dim, spec.dim_out, spec.num_heads, spec.grid,
                                           **attention_options(spec, cfg))
                run.append(GridBlock(f, MlpBranch(spec.dim, cfg.mlp_ratio), drop_path=spec.drop_path))
                if spec.stage_end:  # a stage ends before a transition, so at the end of a run
                    feature_modules.append(f"stages.{len(stages)}")
        stages.append(ReversibleStack(run))
        self.stages = nn.ModuleList(stages)
        self._init_head(2, feature_modules)

    def _final(self, x, norm: bool = True) -> Tensor:
        """The last run's two streams as (B, N_last, 2C) tokens: the final norm reads them without
        concatenating them first (`norm_streams`; in "autograd" mode plainly: twice differentiable)."""
        x1, x2 = x
        if not norm:
            return join_streams(x1, x2)
        return norm_streams(self.norm, x1, x2, lean=self.backprop != "autograd")

    def _run(self, x, specs, take=(), stop=None):
        """As the base's; the final tokens are the last run's two streams (x1, x2)."""
        maps = {}
        x1 = x2 = x
        done = 0  # layers run so far
        for stage in self.stages:
            if isinstance(stage, StageTransition):
                x, done = stage(x1, x2, specs[done].grid), done + 1
                continue
            for i, block in enumerate(stage.blocks):  # bound into the F the stack records (GridBlock)
                block.grid = specs[done + i].grid
            x1, x2 = stage(x, x)  # each run restarts from two copies of its input
            done += len(stage)
            last = specs[done - 1]
            if last.stage_end and last.stage in take:
                maps[last.stage] = join_streams(x1, x2)
            if last.stage_end and last.stage == stop:
                break
        return (x1, x2), maps

    def set_backprop(self, mode: str) -> "RevMViT":
        """"reversible": reversible runs rebuild their activations from their outputs and the transitions
        recompute theirs; "parallel": the same with the two-stream CUDA schedule in the runs; "autograd":
        ordinary backprop keeping everything (the reference)."""
        if mode not in BACKPROP_MODES:
            raise ValueError(f"backprop mode must be one of {BACKPROP_MODES}, got {mode!r}")
        for stage in self.stages:
            if isinstance(stage, ReversibleStack):
                stage.set_backprop(mode)
            else:
                stage.recompute = mode != "autograd"
        return self

    def set_chunking(self, chunk_bytes: Optional[int] = None, fused: bool = True) -> "RevMViT":
        """How "reversible" backprop computes F and G (see `ReversibleStack.set_chunking`): `chunk_bytes`
        None automatic, 0 never split, or a budget in bytes for one piece; `fused` False: G (the MLP)
        recomputed under autograd instead of back-propagated in its own pass. Unless 0, the stage
        transitions also recompute part by part (fusion, attention, MLP): Rev-MViT-B 43.9 -> 25.8 MB per
        image for ~10% more step time."""
        for stage in self.stages:
            if isinstance(stage, StageTransition):
                stage.nested = chunk_bytes != 0
        return set_chunking(self, chunk_bytes, fused)

    @property
    def backprop(self) -> str:
        return self.stages[0].backprop

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch (`train.py --grad-checkpointing`): recomputing activations in backward is what
        reversible backprop does, so True selects "reversible" and False "autograd"."""
        self.set_backprop("reversible" if enable else "autograd")

    def extra_repr(self) -> str:
        return f"backprop={self.backprop!r}"


class MViT(_MultiscaleBase):
    """The non-reversible twin: the same layers and pooling as pre-norm residual blocks on one stream.

    `transition_layers` and `pre_q_fusion` of the config do not apply (no streams to fuse).
    """

    def __init__(self, cfg: Optional[MViTConfig] = None, **kwargs):
        super().__init__()
        grid = self._init_stem(cfg, kwargs)
        cfg = self.cfg
        self.specs = layer_layout(cfg, grid, reversible=False)
        self.grad_checkpointing = False  # timm's activation checkpointing (see set_grad_checkpointing)
        self.blocks = nn.ModuleList([MViTBlock(s, cfg) for s in self.specs])
        self._init_head(1, [f"blocks.{s.index}" for s in self._stage_ends()])

    def _run(self, x, specs, take=(), stop=None):
        maps = {}
        for spec, block in zip(specs, self.blocks, strict=True):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, spec.grid, use_reentrant=False)  # drop path's draws are replayed
            else:
                x = block(x, spec.grid)
            if spec.stage_end and spec.stage in take:
                maps[spec.stage] = x
            if spec.stage_end and spec.stage == stop:
                break
        return x, maps

    def set_backprop(self, mode: str) -> "MViT":
        """Only "autograd" exists here (no reversible blocks); accepted for a uniform training loop."""
        if mode != "autograd":
            raise ValueError(f"MViT has no reversible blocks: backprop mode must be 'autograd', got {mode!r}")
        return self

    @property
    def backprop(self) -> str:
        return "autograd"

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing: each block keeps only its input and recomputes the rest in
        backward (the memory baseline to compare Rev-MViT against). `backprop` stays "autograd"."""
        self.grad_checkpointing = enable


# -- official checkpoints -------------------------------------------------------------------------

def official_to_revvit(state: Mapping[str, Tensor], model: RevMViT,
                       skip_class_token: bool = False) -> tuple[dict[str, Tensor], list[str]]:
    """An official Rev-MViT state dict renamed to `model`'s keys (official layer i is the module
    `model.layer_names[i]`; transitions keep `res_proj`, their fusion MLP becomes `fuse.mlp`). Returns
    (renamed, official keys with no place in `model`)."""
    transitions = [s.index for s in model.specs if s.transition]
    return rename_official_keys(state, model, model.layer_names, transitions, skip_class_token)


def checkpoint_filter_fn(state_dict: dict, model: RevMViT) -> dict:
    """timm's pretrained hook: an official SlowFast Rev-MViT state dict (or whole `.pyth` dict) renamed to
    `model`'s keys; a state dict in our format passes through."""
    return filter_official(state_dict, model, official_to_revvit)


# -- registry -------------------------------------------------------------------------------------

def _video_cfg(**kwargs) -> dict:
    """timm's input_size is (C, H, W); the clip length is the model's `num_frames`."""
    return pretrained_cfg(**{"num_classes": 400, "input_size": (3, 224, 224), "mean": (0.45, 0.45, 0.45),
                             "std": (0.225, 0.225, 0.225), **kwargs})


default_cfgs = generate_default_cfgs({
    "rev_mvit_base": pretrained_cfg(paper_ids="arXiv:2302.04869",
                                    notes=("ImageNet top-1 82.5 (paper), 82.9 (release)",)),
    "rev_mvit_base_16x4": _video_cfg(paper_ids="arXiv:2302.04869", notes=("Kinetics-400 top-1 78.4 (paper)",)),
    "mvit_base": pretrained_cfg(),
    "mvit_base_16x4": _video_cfg(),
    "rev_mvit_tiny": pretrained_cfg(num_classes=10, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
    "mvit_tiny": pretrained_cfg(num_classes=10, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
    "rev_mvit_tiny_video": _video_cfg(num_classes=10, input_size=(3, 32, 32)),
    "mvit_tiny_video": _video_cfg(num_classes=10, input_size=(3, 32, 32)),
})

# Official ImageNet Rev-MViT-B (REV_MVIT_B_16_CONV): 16 layers, 96 -> 768, transitions at 1, 3, 14 (derived:
# transition_layers=None puts one wherever the width or resolution changes).
_BASE = dict(embed_dim=96, depth=16, num_heads=1, drop_path_rate=0.1)
# Official Kinetics Rev-MViT-B 16x4 (REV_MVIT_B_16x4_CONV): Conv3d stem, fused qkv without bias, avg fusion.
_BASE_16X4 = dict(_BASE, img_size=224, num_frames=16, num_classes=400, patch_2d=False, patch_kernel=(3, 7, 7),
                  patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), sep_pos_embed=True, pool_kvq_kernel=(3, 3, 3),
                  pool_kv_stride_adaptive=(1, 8, 8), separate_qkv=False, qkv_bias=False, pre_q_fusion="avg",
                  drop_path_rate=0.05, drop_rate=0.5)
# CPU-sized: 32 px images -> 8x8 tokens, stages 8x8 (C 32) | 4x4 (64) | 2x2 (128); transitions at 1 and 3.
_TINY = dict(img_size=32, num_classes=10, embed_dim=32, num_heads=1, depth=6, dim_mul=((1, 2.0), (3, 2.0)),
             head_mul=((1, 2.0), (3, 2.0)), pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2)),
             pool_kv_stride_adaptive=(1, 2, 2), drop_path_rate=0.1)
_TINY_VIDEO = dict(_TINY, num_frames=4, patch_2d=False, patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4),
                   patch_padding=(1, 3, 3), sep_pos_embed=True, pool_kvq_kernel=(3, 3, 3), separate_qkv=False,
                   qkv_bias=False, pre_q_fusion="avg")


_STAGE_OPTIONS = ("depth", "dim_mul", "head_mul", "pool_q_stride")  # what stage_depths decides


def _create(cls, variant: str, pretrained: bool, defaults: dict, kwargs: dict):
    if kwargs.get("stage_depths") is not None:  # the caller's stages replace the variant's layout
        defaults = {k: v for k, v in defaults.items() if k not in _STAGE_OPTIONS}
    args = {**defaults, **kwargs}
    feature_cfg = dict(feature_cls="getter")
    if args.get("features_only") and "out_indices" not in args:  # all stages unless told
        cfg = MViTConfig(**{k: v for k, v in args.items() if k in {f.name for f in fields(MViTConfig)}})
        feature_cfg["out_indices"] = layer_layout(cfg, reversible=False)[-1].stage + 1
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **args)


@register_model
def rev_mvit_base(pretrained: bool = False, **kwargs) -> RevMViT:
    """Rev-MViT-B, ImageNet 224: 16 layers, widths 96/192/384/768, concat_linear_2 fusion (39.7M params)."""
    return _create(RevMViT, "rev_mvit_base", pretrained, _BASE, kwargs)


@register_model
def rev_mvit_base_16x4(pretrained: bool = False, **kwargs) -> RevMViT:
    """Rev-MViT-B 16x4, Kinetics-400: 16 frames x 224^2, Conv3d (3,7,7)/(2,4,4) stem (34.9M params)."""
    return _create(RevMViT, "rev_mvit_base_16x4", pretrained, _BASE_16X4, kwargs)


@register_model
def mvit_base(pretrained: bool = False, **kwargs) -> MViT:
    """MViT-B twin of rev_mvit_base: the same layers as ordinary pre-norm residual blocks."""
    return _create(MViT, "mvit_base", pretrained, _BASE, kwargs)


@register_model
def mvit_base_16x4(pretrained: bool = False, **kwargs) -> MViT:
    """MViT-B 16x4 twin of rev_mvit_base_16x4."""
    return _create(MViT, "mvit_base_16x4", pretrained, _BASE_16X4, kwargs)


@register_model
def rev_mvit_tiny(pretrained: bool = False, **kwargs) -> RevMViT:
    """CPU-sized Rev-MViT for 32x32 images (16x16 works too): 6 layers, transitions at 1 and 3."""
    return _create(RevMViT, "rev_mvit_tiny", pretrained, _TINY, kwargs)


@register_model
def mvit_tiny(pretrained: bool = False, **kwargs) -> MViT:
    """Twin of rev_mvit_tiny."""
    return _create(MViT, "mvit_tiny", pretrained, _TINY, kwargs)


@register_model
def rev_mvit_tiny_video(pretrained: bool = False, **kwargs) -> RevMViT:
    """CPU-sized Rev-MViT for 4-frame 32x32 clips: Conv3d stem, avg fusion, fused qkv (the K400 recipe)."""
    return _create(RevMViT, "rev_mvit_tiny_video", pretrained, _TINY_VIDEO, kwargs)


@register_model
def mvit_tiny_video(pretrained: bool = False, **kwargs) -> MViT:
    """Twin of rev_mvit_tiny_video."""
    return _create(MViT, "mvit_tiny_video", pretrained, _TINY_VIDEO, kwargs)
