"""Fine-tuning: start a run from a file's weights (`revvit train --pretrained FILE`, `pretrained: FILE`).

Three kinds of file are read, each into (timm name, constructor kwargs, state dict under revvit's names):

    an official SlowFast checkpoint (.pyth)     revvit.load_slowfast maps it exactly (REV_VIT_S/B, REV_MVIT_B[_16x4])
    a revvit weights file (.safetensors)         revvit.save / revvit convert / `revvit train`'s model.safetensors
    a revvit training checkpoint (.pt)           ckpt_<step>.pt or best.pt of `revvit train`

The run's architecture is the file's (`apply_pretrained_arch`) unless the run names another model; the
input geometry (size, channels, classes) is the run's. Before the first step `load_pretrained` copies the
file's weights into the run's model, adapting what the geometry changes: the position embeddings are
resampled to the new patch grid (timm's `resample_abs_pos_embed`, bicubic; a temporal table linearly),
the stem is summed or repeated over input channels, and the classifier is kept when the class count is
the same and left freshly initialised when it differs. Every weight that did not load is named.

Layer-wise lr decay (`layer_decay`, e.g. 0.75): timm's `param_groups_layer_decay`, with the layers of a
revvit model numbered stem 0, block/layer i -> i + 1 (Rev-MViT: in `model.layer_names` order, transitions
included), final norm and head last; the scheduler multiplies each group's lr by its `lr_scale`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from .. import interop
from ..interop.slowfast import load_slowfast_with_info
from ..io import CheckpointError
from .config import TrainConfig
from .optim import build_optimizer
from .parts import TrainError

__all__ = ["Pretrained", "read_pretrained", "apply_pretrained_arch", "adapt_state_dict", "load_pretrained",
           "layer_of", "build_finetune_optimizer", "RUNTIME_KWARGS"]

# constructor kwargs a run sets itself (from its data and config): never taken from a file as architecture
RUNTIME_KWARGS = ("num_classes", "img_size", "in_chans", "num_frames", "drop_path_rate")


@dataclass
class Pretrained:
    path: str
    kind: str  # "slowfast", "safetensors" or "checkpoint"
    model: str  # registered timm name
    model_kwargs: dict  # what rebuilds the file's model (with `model`)
    state: dict  # revvit key names
    class_names: Optional[list] = None

    @property
    def arch_kwargs(self) -> dict:
        return {k: _listify(v) for k, v in self.model_kwargs.items() if k not in RUNTIME_KWARGS}


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_pretrained(path: str | Path) -> Pretrained:
    """The model name, kwargs and weights (revvit names) of an official .pyth, a revvit .safetensors or a
    revvit training checkpoint .pt. Raises CheckpointError for a file that is none of those."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained file not found: {path}")
    if path.endswith(".safetensors") or interop.weights._is_safetensors(path):
        meta = interop.read_metadata(path)
        return Pretrained(path, "safetensors", meta["model"], dict(meta["model_kwargs"]), load_file(path),
                          meta.get("class_names"))
    if path.endswith(".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(path, f"cannot read the checkpoint ({type(e).__name__}: {e})") from None
        if not (isinstance(state, dict) and "model_name" in state and "model" in state):
            raise CheckpointError(path, "not a revvit training checkpoint (no model_name / model)",
                                  "--pretrained takes an official .pyth, a revvit .safetensors or a revvit .pt")
        return Pretrained(path, "checkpoint", state["model_name"], dict(state["model_kwargs"]), dict(state["model"]),
                          state.get("class_names"))
    model, _ = load_slowfast_with_info(path)  # official SlowFast checkpoint, mapped exactly
    name, kwargs = interop.model_spec(model)
    return Pretrained(path, "slowfast", name, kwargs, model.state_dict())


def apply_pretrained_arch(cfg: TrainConfig, pretrained: Pretrained, keep_model: bool = False) -> TrainConfig:
    """`cfg` with the file's architecture (model and model_kwargs, unless `keep_model`) and its input
    geometry (img_size, in_chans, num_frames) as defaults that a flag or key=value given after may change."""
    kw = pretrained.model_kwargs
    if not keep_model:
        cfg.model, cfg.model_kwargs = pretrained.model, pretrained.arch_kwargs
    size = kw.get("img_size")
    if size is None:  # a file built at the registered variant's default input
        pc = timm.models.get_pretrained_cfg(pretrained.model)
        size = pc.input_size[-1] if pc is not None else cfg.img_size
    cfg.img_size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    cfg.in_chans = int(kw.get("in_chans", 3))
    if int(kw.get("num_frames", 1)) > 1:
        cfg.num_frames = int(kw["num_frames"])
    return cfg


# -- adapting a state dict to the run's model --------------------------------------------------------
def _square(n: int) -> Optional[int]:
    side = math.isqrt(n)
    return side if side * side == n else None


def _resample_spatial(pos: Tensor, hw: tuple) -> Tensor:
    """(1, H0*W0, C), square -> (1, h*w, C)."""
    side = _square(pos.shape[1])
    if side is None:
        raise ValueError(f"a spatial position table of {pos.shape[1]} entries is not a square grid")
    return resample_abs_pos_embed(pos, new_size=list(hw), old_size=[side, side], num_prefix_tokens=0)


def _resample_temporal(pos: Tensor, t: int) -> Tensor:
    """(1, T0, C) -> (1, t, C), linear."""
    if pos.shape[1] == t:
        return pos
    return F.interpolate(pos.transpose(1, 2).float(), size=t, mode="linear", align_corners=False
                         ).transpose(1, 2).to(pos.dtype)


def _resample_joint(pos: Tensor, grid: tuple) -> Tensor:
    """Rev-MViT's joint table (1, T0*H0*W0, C) -> (1, t*h*w, C): each frame spatially, then time."""
    t, h, w = grid
    n, c = pos.shape[1], pos.shape[2]
    t0 = next((k for k in (t, 1) if n % k == 0 and _square(n // k)), None)
    if t0 is None:
        raise ValueError(f"cannot read a (T, H, W) grid from a position table of {n} entries")
    frames = pos.reshape(t0, n // t0, c)
    frames = torch.cat([_resample_spatial(f[None], (h, w)) for f in frames])  # (t0, h*w, c)
    if t0 != t:
        frames = F.interpolate(frames.permute(2, 0, 1)[None].float(), size=(t, h * w), mode="bilinear",
                               align_corners=False)[0].permute(1, 2, 0).to(pos.dtype)
    return frames.reshape(1, t * h * w, c)


def _adapt_channels(weight: Tensor, in_chans: int) -> Tensor:
    """A stem conv weight (O, I, ...) for `in_chans` inputs: summed to 1 channel, or repeated and rescaled."""
    old = weight.shape[1]
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    reps = [1, math.ceil(in_chans / old)] + [1] * (weight.dim() - 2)
    return weight.repeat(*reps)[:, :in_chans] * (old / in_chans)


def adapt_state_dict(state: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """`state` reshaped for `model` where the run's geometry differs: position embeddings resampled to the
    model's patch grid, the stem adapted to its input channels, the classifier dropped when its class
    count differs. Returns (state, notes saying what was changed)."""
    own, out, notes = model.state_dict(), dict(state), []
    grid = tuple(model.patch_embed.grid_size)
    for key in ("pos_embed", "pos_embed_spatial", "pos_embed_temporal"):
        if key not in out or key not in own or out[key].shape == own[key].shape:
            continue
        old = tuple(out[key].shape)
        try:
            if key == "pos_embed_temporal":
                out[key] = _resample_temporal(out[key], grid[0])
            elif key == "pos_embed_spatial" or len(grid) == 2:
                out[key] = _resample_spatial(out[key], grid[-2:])
            else:
                out[key] = _resample_joint(out[key], grid)
            notes.append(f"{key} resampled {old} -> {tuple(out[key].shape)} (patch grid {grid})")
        except ValueError as e:
            notes.append(f"{key} not resampled ({e})")
    stem = "patch_embed.proj.weight"
    if stem in out and stem in own and out[stem].shape[1] != own[stem].shape[1]:
        notes.append(f"{stem} adapted from {out[stem].shape[1]} to {own[stem].shape[1]} input channels")
        out[stem] = _adapt_channels(out[stem], own[stem].shape[1])
    head = [k for k in ("head.weight", "head.bias") if k in out and k in own and out[k].shape != own[k].shape]
    if head:
        theirs, ours = out["head.weight"].shape[0], own["head.weight"].shape[0]
        why = (f"the file predicts {theirs} classes, the run {ours}" if theirs != ours else
               f"its input width differs (the file {out['head.weight'].shape[1]}, "
               f"the run {own['head.weight'].shape[1]})")
        notes.append(f"classifier replaced: {why} (head newly initialised)")
        for k in head:
            del out[k]
    return out, notes


MIN_FITTING = 0.5  # refuse a pretrained file that fits less than this share of the model's non-head weights


def load_pretrained(model: nn.Module, path: str | Path, log: Callable[[str], None] = print) -> Pretrained:
    """Copy the weights of `path` into `model` (see the module docstring); says what loaded and names what
    did not. Raises TrainError when the file fits less than half of the model's weights (the head aside):
    another architecture, not a fine-tuning start."""
    pretrained = read_pretrained(path)
    state, notes = adapt_state_dict(pretrained.state, model)
    own = model.state_dict()
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    fits = {k: v for k, v in state.items() if k in own and k not in wrong}
    body = [k for k in own if not k.startswith("head.")]  # a new classifier is the usual fine-tuning change
    if sum(k in fits for k in body) < MIN_FITTING * len(body):
        raise TrainError(f"only {len(fits)} of the {len(own)} weights of {path} ({pretrained.model}) fit the run's "
                         f"model {type(model).__name__} ({len(wrong)} differ in shape, "
                         f"{sum(k not in state for k in body)} missing): it is another architecture; choose the "
                         "file's own (drop --model and model_kwargs that change widths or depth) or another file")
    model.load_state_dict(fits, strict=False)
    missing = sorted(k for k in own if k not in pretrained.state)  # a replaced head is in notes
    unused = sorted(k for k in state if k not in own)
    log(f"pretrained: {len(fits)}/{len(own)} weights from {path} ({pretrained.kind}, {pretrained.model})")
    for note in notes:
        log(f"  {note}")
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        log(f"  not loaded, shape differs: {', '.join(shapes)}")
    if missing:
        log(f"  not in the file (kept as initialised): {', '.join(missing)}")
    if unused:
        log(f"  in the file but not in the model (ignored): {', '.join(unused)}")
    return pretrained


# -- layer-wise learning-rate decay --------------------------------------------------------------------
def layer_of(model: nn.Module) -> Callable[[str], int]:
    """A timm group matcher (name -> layer number) for revvit's models and timm ViTs: stem 0, block i -> i + 1,
    anything after the blocks (final norm, head) depth + 1."""
    if hasattr(model, "stack"):  # Rev-ViT
        blocks = [f"stack.blocks.{i}." for i in range(len(model.stack))]
    elif hasattr(model, "layer_names"):  # Rev-MViT: the module of each official layer, transitions included
        blocks = [name + "." for name in model.layer_names]
    elif hasattr(model, "blocks"):
        blocks = [f"blocks.{i}." for i in range(len(model.blocks))]
    else:
        raise TrainError(f"layer_decay: no known block layout in {type(model).__name__}")

    def group(name: str) -> int:
        if name.startswith(("patch_embed.", "pos_embed", "cls_token")):
            return 0
        for i, prefix in enumerate(blocks):
            if name.startswith(prefix):
                return i + 1
        return len(blocks) + 1

    return group


class _Grouped:
    """What `param_groups_layer_decay` reads of a model: its parameters and a `group_matcher`."""

    def __init__(self, model: nn.Module):
        self.model, self.matcher = model, layer_of(model)

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False):
        return self.matcher


def build_finetune_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`build_optimizer`, or with `cfg.layer_decay` AdamW over timm's layer-decay groups (same weight-decay
    exemptions; lr_scale = layer_decay ** (top layer - layer))."""
    if not cfg.layer_decay or cfg.layer_decay == 1.0:
        return build_optimizer(model, cfg)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    source = model if hasattr(model, "group_matcher") else _Grouped(model)
    groups = param_groups_layer_decay(source, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.effective_lr, betas=tuple(cfg.betas), eps=cfg.eps)
