"""Rev-MViT (Mangalam et al., CVPR 2022) and its non-reversible twin MViT, for images and video.

    input (B, C, [T,] H, W) -> conv patch embed + position embedding -> tokens (B, N, C0) on grid (T, H, W)
    Rev-MViT: per run of reversible blocks X1 = X2 = x; F = LN -> pooling attention (K/V pooled, Q not),
              G = LN -> MLP; between runs a stage-transition block fuses the two streams and does the
              width change and Q pooling with an ordinary residual; head LN([Y1, Y2]) -> mean -> Linear
    MViT:     the same layers as pre-norm residual blocks on one stream; head LN(x) -> mean -> Linear

One config describes both (`MViTConfig`): widths and heads grow by `dim_mul`/`head_mul` at given
layers, `pool_q_stride` downsamples at given layers, K/V strides start at `pool_kv_stride_adaptive` and
shrink with every Q stride. In Rev-MViT every layer that changes the width or resolution must be one of
`transition_layers` (the official BUFFER_LAYERS). The layer arithmetic (rounding of widths, K/V
strides, pooling kernels, fusion, the transition's residual path) follows the official release, and an
official checkpoint loads through `checkpoint_filter_fn` (renames only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch
from timm.layers import DropPath, drop_path, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import Mlp, PatchEmbed3d, PoolingAttention, TokenClassifierMixin, pooled_grid
from ..layers.pooling_attention import Grid
from ..reversible import BACKPROP_MODES, ReversibleBlock, ReversibleStack, records_graph
from .vit import MlpBranch, _cfg, init_weights_official, known_options

__all__ = ["MViTConfig", "LayerSpec", "layer_layout", "RevMViT", "MViT", "checkpoint_filter_fn"]


# -- configuration --------------------------------------------------------------------------------

@dataclass
class MViTConfig:
    """Everything that defines a Rev-MViT / MViT. Per-layer lists use the official `[layer, ...]` format.

    `stage_depths` is a shorthand: stages of (d0, d1, ...) layers where each stage after the first opens
    with a layer that doubles width and heads and pools Q by (1, 2, 2) (a transition in Rev-MViT). When
    given it sets depth, dim_mul, head_mul and pool_q_stride (and transition_layers, unless given).
    """
    img_size: int = 224
    num_frames: int = 1
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depth: int = 16
    num_heads: int = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    separate_qkv: bool = True  # q, k, v Linear layers (ImageNet release) or one fused qkv (Kinetics)
    dim_mul: tuple = ((1, 2.0), (3, 2.0), (14, 2.0))  # (layer, multiplier): width grows *at* that layer
    head_mul: tuple = ((1, 2.0), (3, 2.0), (14, 2.0))
    pool_q_stride: tuple = ((1, 1, 2, 2), (3, 1, 2, 2), (14, 1, 2, 2))  # (layer, st, sh, sw)
    pool_kvq_kernel: Optional[tuple] = (1, 3, 3)  # None: kernel s+1 (s > 1) or 1 from each stride
    pool_kv_stride_adaptive: Optional[tuple] = (1, 4, 4)  # K/V stride of layer 0, divided by each Q stride
    pool_kv_stride: tuple = ()  # explicit (layer, st, sh, sw) entries, used when the adaptive one is None
    transition_layers: Optional[tuple] = None  # Rev-MViT only; None: every layer that changes shape
    pre_q_fusion: str = "concat_linear_2"  # Rev-MViT only: "concat_linear_<mult>" (2C) or "avg" (C)
    sep_pos_embed: bool = False  # separate spatial (1, HW, C) and temporal (1, T, C) position embeddings
    patch_kernel: tuple = (7, 7)
    patch_stride: tuple = (4, 4)
    patch_padding: tuple = (3, 3)
    patch_2d: bool = True  # Conv2d stem (images) or Conv3d stem (video, triples above)
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.1  # linear in the layer index over all layers (transitions included)
    global_pool: str = "avg"
    stage_depths: Optional[tuple] = None

    def __post_init__(self):
        if self.stage_depths is not None:
            depths = tuple(int(d) for d in self.stage_depths)
            if not depths or min(depths) < 1:
                raise ValueError(f"stage_depths must be positive layer counts, got {self.stage_depths}")
            starts = [sum(depths[:k]) for k in range(1, len(depths))]
            self.stage_depths = depths
            self.depth = sum(depths)
            self.dim_mul = self.head_mul = tuple((i, 2.0) for i in starts)
            self.pool_q_stride = tuple((i, 1, 2, 2) for i in starts)
            if self.transition_layers is None:
                self.transition_layers = tuple(starts)


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the layout. `dim` is one stream's width in, `dim_out` the width out."""
    index: int
    dim: int
    dim_out: int
    num_heads: int
    grid: Grid
    grid_out: Grid
    kernel_q: tuple
    stride_q: tuple
    kernel_kv: tuple
    stride_kv: tuple
    transition: bool
    drop_path: float

    @property
    def changes_shape(self) -> bool:
        return self.dim != self.dim_out or self.grid != self.grid_out


def round_width(width: float, multiplier: float, divisor: int = 1) -> int:
    """The official width rounding: width*multiplier to a multiple of divisor, never more than 10% down."""
    width = width * multiplier
    out = max(1, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


def _kernel_for(stride: Sequence[int], kernel: Optional[Sequence[int]]) -> tuple:
    return tuple(kernel) if kernel is not None else tuple(s + 1 if s > 1 else s for s in stride)


def _per_layer(entries: Sequence[Sequence], depth: int, what: str, allow_end: bool = False) -> dict[int, tuple]:
    out = {}
    for entry in entries:
        i, *values = entry
        top = depth if allow_end else depth - 1
        if not 0 <= int(i) <= top:
            raise ValueError(f"{what} names layer {i}, but the model has layers 0..{depth - 1}")
        out[int(i)] = tuple(values)
    return out


def layer_layout(cfg: MViTConfig, grid: Grid, reversible: bool = True) -> list[LayerSpec]:
    """Per-layer widths, heads, grids and pooling of `cfg` on an input token grid; validates the layout.

    Raises ValueError on an invalid layout, naming the layer and the fix.
    """
    depth = cfg.depth
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    dim_mul, head_mul = [1.0] * (depth + 1), [1.0] * (depth + 1)
    for i, (m,) in _per_layer(cfg.dim_mul, depth, "dim_mul", allow_end=True).items():
        dim_mul[i] = float(m)
    for i, (m,) in _per_layer(cfg.head_mul, depth, "head_mul", allow_end=True).items():
        head_mul[i] = float(m)
    stride_q = _per_layer(cfg.pool_q_stride, depth, "pool_q_stride")
    for i, s in stride_q.items():
        if len(s) != 3:
            raise ValueError(f"pool_q_stride entries are (layer, st, sh, sw), got {(i,) + s}")
    if cfg.pool_kv_stride_adaptive is not None:
        stride_kv, current = {}, tuple(cfg.pool_kv_stride_adaptive)
        for i in range(depth):
            if i in stride_q:
                current = tuple(max(c // s, 1) for c, s in zip(current, stride_q[i]))
            stride_kv[i] = current
    else:
        stride_kv = _per_layer(cfg.pool_kv_stride, depth, "pool_kv_stride")

    specs, rates = [], torch.linspace(0, cfg.drop_path_rate, depth).tolist()
    heads, dim = cfg.num_heads, cfg.embed_dim
    for i in range(depth):
        heads = round_width(heads, head_mul[i])
        dim = round_width(dim, dim_mul[i - 1] if i > 0 else 1.0, divisor=heads)
        dim_out = round_width(dim, dim_mul[i], divisor=round_width(heads, head_mul[i + 1]))
        if dim_out % heads:
            raise ValueError(f"layer {i}: width {dim_out} is not divisible by its {heads} heads")
        sq, skv = stride_q.get(i, ()), stride_kv.get(i, ())
        kq = _kernel_for(sq, cfg.pool_kvq_kernel) if sq else ()
        kkv = _kernel_for(skv, cfg.pool_kvq_kernel) if skv else ()
        if math.prod(kq) == 1 and math.prod(sq) == 1:  # a (1, 1, 1) pooling is no pooling
            kq, sq = (), ()
        if math.prod(kkv) == 1 and math.prod(skv) == 1:
            kkv, skv = (), ()
        grid_out = pooled_grid(grid, kq, sq) if sq else tuple(grid)
        specs.append(LayerSpec(i, dim, dim_out, heads, tuple(grid), grid_out, kq, sq, kkv, skv, False, rates[i]))
        grid = grid_out
    if reversible:
        specs = _mark_transitions(specs, cfg.transition_layers)
    return specs


def _mark_transitions(specs: list[LayerSpec], transition_layers: Optional[Sequence[int]]) -> list[LayerSpec]:
    depth = len(specs)
    if transition_layers is None:
        chosen = {s.index for s in specs if s.changes_shape}
    else:
        chosen = {int(i) for i in transition_layers}
        outside = sorted(i for i in chosen if not 0 <= i < depth)
        if outside:
            raise ValueError(f"transition_layers {outside} are outside the model's layers 0..{depth - 1}")
    for s in specs:
        if s.changes_shape and s.index not in chosen:
            change = []
            if s.dim != s.dim_out:
                change.append(f"changes the width {s.dim}->{s.dim_out}")
            if s.grid != s.grid_out:
                change.append(f"pools Q with stride {s.stride_q} (grid {s.grid}->{s.grid_out})")
            raise ValueError(f"layer {s.index} {' and '.join(change)}, but a reversible block must keep its "
                             f"input shape: add {s.index} to transition_layers")
    for i in sorted(chosen):
        if i == 0 or i - 1 in chosen:
            raise ValueError(f"transition layer {i} must follow a reversible block, whose two streams it fuses; "
                             f"start the model and every run with a reversible layer")
        if i == depth - 1:
            raise ValueError(f"the last layer ({i}) is a transition; the model must end with a reversible run "
                             f"(the head normalises its two streams)")
    return [LayerSpec(**{**s.__dict__, "transition": s.index in chosen}) for s in specs]


def _parse_fusion(mode: str) -> Optional[float]:
    """None for "avg", the hidden-width multiplier for "concat_linear[_<mult>]"."""
    if mode == "avg":
        return None
    parts = mode.split("_")
    if parts[:2] == ["concat", "linear"] and len(parts) in (2, 3):
        try:
            return float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            pass
    raise ValueError(f"pre_q_fusion must be 'avg' or 'concat_linear_<mult>' (e.g. 'concat_linear_2'), got {mode!r}")


# -- blocks ---------------------------------------------------------------------------------------

class PoolingAttentionBranch(nn.Module):
    """F: LayerNorm -> pooling attention on the fixed grid `grid`; (B, N, dim) -> (B, N', dim_out).

    The grid is fixed at construction because the reversible engine calls F with one tensor.
    """

    def __init__(self, spec: LayerSpec, dim: int, qkv_bias: bool, separate_qkv: bool):
        super().__init__()
        self.grid = spec.grid
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PoolingAttention(dim, spec.dim_out, spec.num_heads, qkv_bias=qkv_bias, separate_qkv=separate_qkv,
                                     kernel_q=spec.kernel_q, stride_q=spec.stride_q,
                                     kernel_kv=spec.kernel_kv, stride_kv=spec.stride_kv)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.norm(x), self.grid)[0]


class StreamFusion(nn.Module):
    """Merge the two streams (B, N, C) of a reversible run before a transition.

    "avg": (X1 + X2) / 2, width C. "concat_linear_<m>": x = [X1, X2] (2C), then x + MLP(x) with hidden
    width m * 2C (the official `pre_q_fuse.fuse_fn` is our `mlp`).
    """

    def __init__(self, mode: str, dim: int):
        super().__init__()
        self.mode = mode
        mult = _parse_fusion(mode)
        self.dim_out = dim if mult is None else 2 * dim
        self.mlp = None if mult is None else Mlp(2 * dim, int(2 * dim * mult), 2 * dim)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.mlp is None:
            return (x1 + x2) / 2
        x = torch.cat([x1, x2], dim=-1)
        return x + self.mlp(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class StageTransition(nn.Module):
    """The non-reversible block between reversible runs: two streams (B, N, C) -> one (B, N', C_out).

        x   = fuse(X1, X2)                                  (B, N, C or 2C)
        res = pool_q(res_proj(x))    res_proj only if the width changes; pooled by the attention's own
                                     Q conv + norm (shared weights), per head
        x   = res + F(x)             F = LN -> pooling attention with Q stride, width -> C_out
        x   = x + G(x)               G = LN -> MLP
        out = DropPath(x)            on the whole block output, as in the official release

    With `recompute` (set by RevMViT's "reversible" mode) the block keeps none of its activations and
    recomputes them in backward (activation checkpointing, random draws replayed). Its inputs are the
    previous run's outputs, which reversible backprop keeps anyway, so the transitions, the largest
    activation holders of the official model (full resolution, before the Q pooling), cost no memory
    after the forward pass.
    """

    def __init__(self, spec: LayerSpec, fusion: str, mlp_ratio: float, qkv_bias: bool, separate_qkv: bool):
        super().__init__()
        self.fuse = StreamFusion(fusion, spec.dim)
        dim = self.fuse.dim_out
        self.f = PoolingAttentionBranch(spec, dim, qkv_bias, separate_qkv)
        self.res_proj = nn.Linear(dim, spec.dim_out) if dim != spec.dim_out else None
        self.g = MlpBranch(spec.dim_out, mlp_ratio)
        self.drop_path = spec.drop_path
        self.recompute = True

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.recompute and records_graph(self, x1, x2):
            return checkpoint(self._forward, x1, x2, use_reentrant=False, preserve_rng_state=True)
        return self._forward(x1, x2)

    def _forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x = self.fuse(x1, x2)
        res = x if self.res_proj is None else self.res_proj(x)
        x = self.f.attn.pool_like_q(res, self.f.grid) + self.f(x)
        x = x + self.g(x)
        return drop_path(x, self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}, recompute={self.recompute}"


class MViTBlock(nn.Module):
    """Pre-norm MViT block on one stream, (B, N, dim) on a fixed grid -> (B, N', dim_out).

        x = pool_skip(res_proj(LN1(x)) or x) + DropPath(attn(LN1(x)))
        x = x + DropPath(MLP(LN2(x)))

    The attention does the width change and the Q pooling; the residual is projected from LN1(x) when the
    width changes and max-pooled (kernel s+1, stride s) when Q is strided, as in the official MViTv2 block.
    """

    def __init__(self, spec: LayerSpec, mlp_ratio: float, qkv_bias: bool, separate_qkv: bool):
        super().__init__()
        self.grid = spec.grid
        self.norm1 = nn.LayerNorm(spec.dim, eps=1e-6)
        self.attn = PoolingAttention(spec.dim, spec.dim_out, spec.num_heads, qkv_bias=qkv_bias,
                                     separate_qkv=separate_qkv, kernel_q=spec.kernel_q, stride_q=spec.stride_q,
                                     kernel_kv=spec.kernel_kv, stride_kv=spec.stride_kv)
        self.res_proj = nn.Linear(spec.dim, spec.dim_out) if spec.dim != spec.dim_out else None
        self.pool_skip = None
        if spec.stride_q and math.prod(spec.stride_q) > 1:
            kernel = [s + 1 if s > 1 else s for s in spec.stride_q]
            self.pool_skip = nn.MaxPool3d(kernel, spec.stride_q, [k // 2 for k in kernel])
        self.drop_path = DropPath(spec.drop_path) if spec.drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(spec.dim_out, eps=1e-6)
        self.mlp = Mlp(spec.dim_out, int(spec.dim_out * mlp_ratio))

    def _pool_skip(self, x: Tensor) -> Tensor:
        if self.pool_skip is None:
            return x
        b, _, c = x.shape
        x = self.pool_skip(x.transpose(1, 2).reshape(b, c, *self.grid))
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        x_norm = self.norm1(x)
        y, _ = self.attn(x_norm, self.grid)
        x = self._pool_skip(x if self.res_proj is None else self.res_proj(x_norm)) + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# -- models ---------------------------------------------------------------------------------------

def _config(cfg: Optional[MViTConfig], kwargs: dict) -> MViTConfig:
    if cfg is not None:
        if kwargs:
            raise TypeError(f"pass either cfg or keyword options, not both (got {sorted(kwargs)})")
        return cfg
    return MViTConfig(**known_options(MViTConfig, kwargs))


class _MultiscaleBase(TokenClassifierMixin, nn.Module):
    """What Rev-MViT and MViT share: stem, position embeddings, head, timm's interface."""

    cfg: MViTConfig
    specs: list[LayerSpec]

    def _init_stem(self, cfg: MViTConfig) -> Grid:
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.patch_embed = PatchEmbed3d(cfg.img_size, cfg.num_frames, cfg.in_chans, cfg.embed_dim, cfg.patch_kernel,
                                        cfg.patch_stride, cfg.patch_padding, conv_2d=cfg.patch_2d)
        t, h, w = grid = self.patch_embed.grid_size
        if cfg.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, cfg.embed_dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, cfg.embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, t * h * w, cfg.embed_dim))
        return grid

    def _init_head(self, num_features: int, feature_levels: list[tuple[int, str]]) -> None:
        """feature_levels: (layer index the level ends at, module name) per stage."""
        self.num_features = self.head_hidden_size = num_features
        self.norm = nn.LayerNorm(num_features, eps=1e-6)
        self.head_drop = nn.Dropout(self.cfg.drop_rate)
        self.head = nn.Linear(num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.apply(init_weights_official)
        for p in self.no_weight_decay():
            trunc_normal_(getattr(self, p), std=0.02)
        stride = self.patch_embed.stride[1]
        self.feature_info = []
        for layer, module in feature_levels:
            spec = self.specs[layer]
            self.feature_info.append(dict(num_chs=self._level_channels(spec), module=module,
                                          reduction=stride * self.specs[0].grid[1] // spec.grid_out[1]))

    def _level_channels(self, spec: LayerSpec) -> int:
        raise NotImplementedError

    def _stage_ends(self) -> list[int]:
        """Index of the last layer of each stage; a stage ends before a layer that changes the shape."""
        return [s.index - 1 for s in self.specs[1:] if s.changes_shape] + [len(self.specs) - 1]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed_spatial", "pos_embed_temporal"} if self.cfg.sep_pos_embed else {"pos_embed"}

    def _embed(self, x: Tensor) -> Tensor:
        x, (t, h, w) = self.patch_embed(x)
        if self.cfg.sep_pos_embed:  # token t*HW + s gets spatial[s] + temporal[t]
            pos = self.pos_embed_spatial.repeat(1, t, 1) + self.pos_embed_temporal.repeat_interleave(h * w, dim=1)
            return x + pos
        return x + self.pos_embed

    def _run(self, x: Tensor, take: Sequence[int] = (), stop: Optional[int] = None) -> tuple[Tensor, dict[int, Tensor]]:
        """Tokens after the stem -> (final tokens, {level: that stage's output tokens} for levels in take)."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, [T,] H, W) -> normalised tokens (B, N_last, num_features)."""
        return self.norm(self._run(self._embed(x))[0])

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
        x, maps = self._run(self._embed(x), take, stop=stop)
        ends = self._stage_ends()
        out = []
        for level in take:
            y = self.norm(maps[level]) if norm and level == last else maps[level]
            if output_fmt == "NCHW":
                b, n, c = y.shape
                t, h, w = self.specs[ends[level]].grid_out
                y = y.transpose(1, 2).reshape(b, c, t, h, w)
                if image and t == 1:
                    y = y.squeeze(2)
            out.append(y)
        if intermediates_only:
            return out
        return (x if stop is not None else self.norm(x)), out

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
        cfg = _config(cfg, kwargs)
        grid = self._init_stem(cfg)
        _parse_fusion(cfg.pre_q_fusion)
        self.specs = layer_layout(cfg, grid, reversible=True)

        stages: list[nn.Module] = []
        self.layer_names: list[str] = []
        run: list[ReversibleBlock] = []
        self._stage_of_layer: list[int] = []
        for spec in self.specs:
            if spec.transition:
                stages.append(ReversibleStack(run))
                run = []
                self.layer_names.append(f"stages.{len(stages)}")
                self._stage_of_layer.append(len(stages))
                stages.append(StageTransition(spec, cfg.pre_q_fusion, cfg.mlp_ratio, cfg.qkv_bias, cfg.separate_qkv))
            else:
                self.layer_names.append(f"stages.{len(stages)}.blocks.{len(run)}")
                self._stage_of_layer.append(len(stages))
                f = PoolingAttentionBranch(spec, spec.dim, cfg.qkv_bias, cfg.separate_qkv)
                run.append(ReversibleBlock(f, MlpBranch(spec.dim, cfg.mlp_ratio), drop_path=spec.drop_path))
        stages.append(ReversibleStack(run))
        self.stages = nn.ModuleList(stages)
        # feature level k ends with the reversible run holding its last layer
        self._level_at_stage = {self._stage_of_layer[e]: k for k, e in enumerate(self._stage_ends())}
        self._init_head(2 * self.specs[-1].dim_out,
                        [(e, f"stages.{self._stage_of_layer[e]}") for e in self._stage_ends()])

    def _level_channels(self, spec: LayerSpec) -> int:
        return 2 * spec.dim_out

    def _run(self, x, take=(), stop=None):
        maps = {}
        x1 = x2 = x
        for i, stage in enumerate(self.stages):
            if isinstance(stage, ReversibleStack):
                x1, x2 = stage(x, x)  # each run restarts from two copies of its input
                level = self._level_at_stage.get(i)
                if level is not None and level in take:
                    maps[level] = torch.cat([x1, x2], dim=-1)
                if stop is not None and level == stop:
                    break
            else:
                x = stage(x1, x2)
        return torch.cat([x1, x2], dim=-1), maps

    def set_backprop(self, mode: str) -> "RevMViT":
        """"reversible": reversible runs rebuild their activations from their outputs and the transitions
        recompute theirs; "autograd": ordinary backprop keeping everything (the reference)."""
        if mode not in BACKPROP_MODES:
            raise ValueError(f"backprop mode must be one of {BACKPROP_MODES}, got {mode!r}")
        for stage in self.stages:
            if isinstance(stage, ReversibleStack):
                stage.set_backprop(mode)
            else:
                stage.recompute = mode == "reversible"
        return self

    @property
    def backprop(self) -> str:
        return self.stages[0].backprop

    def extra_repr(self) -> str:
        return f"backprop={self.backprop!r}"


class MViT(_MultiscaleBase):
    """The non-reversible twin: the same layers and pooling as pre-norm residual blocks on one stream.

    `transition_layers` and `pre_q_fusion` of the config do not apply (no streams to fuse).
    """

    def __init__(self, cfg: Optional[MViTConfig] = None, **kwargs):
        super().__init__()
        cfg = _config(cfg, kwargs)
        grid = self._init_stem(cfg)
        self.specs = layer_layout(cfg, grid, reversible=False)
        self.blocks = nn.ModuleList([MViTBlock(s, cfg.mlp_ratio, cfg.qkv_bias, cfg.separate_qkv) for s in self.specs])
        self._level_at_block = {e: k for k, e in enumerate(self._stage_ends())}
        self._init_head(self.specs[-1].dim_out, [(e, f"blocks.{e}") for e in self._stage_ends()])

    def _level_channels(self, spec: LayerSpec) -> int:
        return spec.dim_out

    def _run(self, x, take=(), stop=None):
        maps = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            level = self._level_at_block.get(i)
            if level is not None and level in take:
                maps[level] = x
            if stop is not None and level == stop:
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


# -- official checkpoints -------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: RevMViT) -> dict:
    """timm's pretrained hook: an official SlowFast state dict (or whole `.pyth` dict) renamed to `model`'s
    keys by the one official-name mapping in `revvit.interop`; a state dict in our format passes through."""
    from ..interop.slowfast import official_to_revvit  # at call time: interop builds on the models

    state_dict = state_dict.get("model_state", state_dict)
    if not any(k.removeprefix("module.").startswith(("rev_backbone.", "head.projection.")) for k in state_dict):
        return state_dict
    mapped, unused = official_to_revvit(state_dict, model, skip_class_token=True)
    if unused:
        raise ValueError(f"official checkpoint keys with no place in {type(model).__name__}: {sorted(unused)}")
    return mapped


# -- registry -------------------------------------------------------------------------------------

def _video_cfg(**kwargs) -> dict:
    """timm's input_size is (C, H, W); the clip length is the model's `num_frames`."""
    return _cfg(**{"num_classes": 400, "input_size": (3, 224, 224), "mean": (0.45, 0.45, 0.45),
                   "std": (0.225, 0.225, 0.225), **kwargs})


default_cfgs = generate_default_cfgs({
    "rev_mvit_base": _cfg(paper_ids="arXiv:2302.04869", notes=("ImageNet top-1 82.5 (paper), 82.9 (release)",)),
    "rev_mvit_base_16x4": _video_cfg(paper_ids="arXiv:2302.04869", notes=("Kinetics-400 top-1 78.4 (paper)",)),
    "mvit_base": _cfg(),
    "mvit_base_16x4": _video_cfg(),
    "rev_mvit_tiny": _cfg(num_classes=10, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
    "mvit_tiny": _cfg(num_classes=10, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
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


def _num_stages(args: dict) -> int:
    """Feature levels of the model `args` describe (for `features_only`), without building it."""
    cfg = MViTConfig(**{k: v for k, v in args.items() if k in {f.name for f in fields(MViTConfig)}})
    stem = PatchEmbed3d(cfg.img_size, cfg.num_frames, cfg.in_chans, 1, cfg.patch_kernel, cfg.patch_stride,
                        cfg.patch_padding, conv_2d=cfg.patch_2d)
    return 1 + sum(s.changes_shape for s in layer_layout(cfg, stem.grid_size, reversible=False)[1:])


def _create(cls, variant: str, pretrained: bool, defaults: dict, kwargs: dict):
    args = {**defaults, **kwargs}
    feature_cfg = dict(feature_cls="getter")
    if args.get("features_only"):
        feature_cfg["out_indices"] = _num_stages(args)  # all stages unless out_indices is given
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
