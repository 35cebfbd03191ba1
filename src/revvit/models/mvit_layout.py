"""The Rev-MViT / MViT layout: the architecture config and the per-layer arithmetic, no modules.

`layer_layout(cfg)` turns an `MViTConfig` into one `LayerSpec` per layer: widths and heads grow by
`dim_mul`/`head_mul` at given layers (the official width rounding), `pool_q_stride` downsamples at given
layers, K/V strides start at `pool_kv_stride_adaptive` and shrink with every Q stride, pooling kernels
come from `pool_kvq_kernel` or the strides. In Rev-MViT every layer that changes the width or the
resolution must be one of `transition_layers` (the official BUFFER_LAYERS). The arithmetic follows the
official release; it is the one copy in revvit (the SlowFast config reader translates official configs
into `MViTConfig` and calls this).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..layers import Grid, patch_grid, pooled_grid
from ._common import check_common_options, check_flag, check_int, check_ints, check_number

__all__ = ["MViTConfig", "LayerSpec", "layer_layout", "input_grid", "round_width", "parse_fusion"]


@dataclass
class MViTConfig:
    """Everything that defines a Rev-MViT / MViT. Per-layer lists use the official `[layer, ...]` format.

    `stage_depths` is a shorthand: stages of (d0, d1, ...) layers where each stage after the first opens
    with a layer that doubles width and heads and pools Q by (1, 2, 2) (a transition in Rev-MViT). When
    given it sets depth, dim_mul, head_mul and pool_q_stride (and transition_layers, unless given); an
    explicit value of those four that is neither its default nor what the stages imply is refused.

    An invalid value is refused at construction (ValueError naming the option, the value and what is
    allowed); the per-layer lists are kept as tuples. Whether the layers fit together (layer indices,
    widths, transitions) is `layer_layout`'s check.
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
    dynamic_img_size: bool = False  # any input size the strides divide: pos embeds resampled, grids follow

    def __post_init__(self):
        check_common_options(self)
        self.num_frames = check_int("num_frames", self.num_frames)
        for name in ("separate_qkv", "sep_pos_embed", "patch_2d"):
            setattr(self, name, check_flag(name, getattr(self, name)))
        n = 2 if self.patch_2d else 3
        for name, minimum in (("patch_kernel", 1), ("patch_stride", 1), ("patch_padding", 0)):
            value = getattr(self, name)
            value = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
            try:
                setattr(self, name, check_ints(name, value, (n,), minimum))
            except ValueError as e:
                raise ValueError(f"{e}; patch_2d={self.patch_2d} takes {'(h, w)' if n == 2 else '(t, h, w)'}") from None
        for name in ("pool_kvq_kernel", "pool_kv_stride_adaptive"):
            if getattr(self, name) is not None:
                setattr(self, name, check_ints(f"{name} (t, h, w)", getattr(self, name), (3,)))
        self.dim_mul, self.head_mul = _multipliers("dim_mul", self.dim_mul), _multipliers("head_mul", self.head_mul)
        self.pool_q_stride = _strides("pool_q_stride", self.pool_q_stride)
        self.pool_kv_stride = _strides("pool_kv_stride", self.pool_kv_stride)
        if self.transition_layers is not None:
            self.transition_layers = tuple(_layer_index("transition_layers", i) for i in _entries(
                "transition_layers", self.transition_layers, "layer indices"))
        parse_fusion(self.pre_q_fusion)
        if self.stage_depths is not None:
            self._apply_stage_depths()

    def _apply_stage_depths(self) -> None:
        what = "a non-empty list of layer counts >= 1"
        depths = tuple(check_int("stage_depths entries", d) for d in _entries("stage_depths", self.stage_depths, what))
        if not depths:
            raise ValueError(f"stage_depths must be {what}, got {self.stage_depths!r}")
        starts = [sum(depths[:k]) for k in range(1, len(depths))]
        implied = dict(depth=sum(depths), dim_mul=tuple((i, 2.0) for i in starts),
                       head_mul=tuple((i, 2.0) for i in starts), pool_q_stride=tuple((i, 1, 2, 2) for i in starts))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in implied.items():  # a value the user set on purpose must not be overwritten
            given = _nested_tuple(getattr(self, name))
            if given != _nested_tuple(defaults[name]) and given != value:
                raise ValueError(f"{name}={getattr(self, name)} conflicts with stage_depths={self.stage_depths}, "
                                 f"which implies {name}={value}; give one of the two")
        self.stage_depths = depths
        for name, value in implied.items():
            setattr(self, name, value)
        if self.transition_layers is None:
            self.transition_layers = tuple(starts)


def _entries(name: str, value, what: str) -> tuple:
    """A list or tuple option as a tuple; a ValueError naming the option otherwise."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return tuple(value)


def _layer_index(name: str, value) -> int:
    return check_int(f"{name} layer index", value, minimum=0)


def _multipliers(name: str, value) -> tuple:
    """(layer, multiplier) entries: a layer index and a finite multiplier > 0."""
    out = []
    for entry in _entries(name, value, "a list of (layer, multiplier) entries"):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(f"{name} entries must be (layer, multiplier), got {entry!r}")
        check_number(f"the multiplier of {name} entry {tuple(entry)}", entry[1], lambda m: m > 0, "a number > 0")
        out.append((_layer_index(name, entry[0]), entry[1]))
    return tuple(out)


def _strides(name: str, value) -> tuple:
    """(layer, st, sh, sw) entries: a layer index and three strides >= 1."""
    out = []
    for entry in _entries(name, value, "a list of (layer, st, sh, sw) entries"):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 4):
            raise ValueError(f"{name} entries must be (layer, st, sh, sw), got {entry!r}")
        out.append((_layer_index(name, entry[0]),) + check_ints(f"the strides of {name} entry {tuple(entry)}",
                                                                tuple(entry[1:]), (3,)))
    return tuple(out)


def _nested_tuple(value):
    """Lists (from JSON or YAML) as tuples, so equal layouts compare equal."""
    return tuple(_nested_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the layout. `dim` is one stream's width in, `dim_out` the width out.

    `stage` is the feature stage the layer belongs to (timm's feature level): a new stage opens at every
    layer after the first that changes the shape. `stage_end` marks the last layer of a stage: its output
    is the stage's feature map.
    """
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
    stage: int = 0
    stage_end: bool = False

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


def parse_fusion(mode: str) -> Optional[float]:
    """None for "avg", the hidden-width multiplier for "concat_linear[_<mult>]"; ValueError otherwise."""
    if mode == "avg":
        return None
    parts = mode.split("_") if isinstance(mode, str) else []
    if parts[:2] == ["concat", "linear"] and len(parts) in (2, 3):
        try:
            return float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            pass
    raise ValueError(f"pre_q_fusion must be 'avg' or 'concat_linear_<mult>' (e.g. 'concat_linear_2'), got {mode!r}")


def input_grid(cfg: MViTConfig) -> Grid:
    """The token grid (T, H, W) the stem of `cfg` makes of its input."""
    return patch_grid(cfg.img_size, cfg.num_frames, cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding,
                      cfg.patch_2d)


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


def layer_layout(cfg: MViTConfig, grid: Optional[Grid] = None, reversible: bool = True) -> list[LayerSpec]:
    """Per-layer widths, heads, grids, pooling and stages of `cfg` on the input token grid `grid` (None:
    the grid of `cfg`'s stem); with `reversible`, the stage transitions too. Validates the layout.

    Raises ValueError on an invalid layout, naming the layer and the fix.
    """
    depth = cfg.depth
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    if reversible:
        parse_fusion(cfg.pre_q_fusion)
    grid = tuple(grid) if grid is not None else input_grid(cfg)
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

    # float32 linspace as the official code; on the CPU whatever the default device (e.g. "meta")
    specs, rates = [], torch.linspace(0, cfg.drop_path_rate, depth, device="cpu").tolist()
    heads, dim, stage = cfg.num_heads, cfg.embed_dim, 0
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
        spec = LayerSpec(i, dim, dim_out, heads, tuple(grid), grid_out, kq, sq, kkv, skv, False, rates[i])
        if i > 0 and spec.changes_shape:
            stage += 1
        specs.append(dataclasses.replace(spec, stage=stage))
        grid = grid_out
    specs = [dataclasses.replace(s, stage_end=i == depth - 1 or specs[i + 1].stage != s.stage)
             for i, s in enumerate(specs)]
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
    return [dataclasses.replace(s, transition=s.index in chosen) for s in specs]
