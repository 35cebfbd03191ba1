"""What the model families share: option checking (names and values), the pretrained cfg, the official init, and the
renaming of official SlowFast checkpoint keys that every family's `checkpoint_filter_fn` builds on.

Official keys (REFERENCE.md section 4) differ from revvit's in a few fixed places: the reversible
layers `rev_backbone.layers.{i}.{F,G}.` (each family says which module holds layer i), the stage
transition's `pre_q_fuse.fuse_fn.` (our `fuse.mlp.`) and the head `head.projection.` (our `head.`);
the stem, position embeddings and final norm keep their names.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional, Sequence

from timm.layers import trunc_normal_
from torch import Tensor, nn

__all__ = ["known_options", "check_int", "check_ints", "check_size", "check_flag", "check_number",
           "check_common_options", "pretrained_cfg", "init_weights_official", "is_official_state_dict",
           "rename_official_keys", "filter_official"]


def known_options(config_cls, kwargs: dict) -> dict:
    """Keep the kwargs the config knows; refuse others by name so typos do not pass silently."""
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"{config_cls.__name__} got unknown option(s) {unknown}; known: {sorted(names)}")
    return kwargs


# -- option values: a ValueError "<option> must be <what is allowed>, got <value>" ------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is no size


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int, or a ValueError unless it is an integer >= minimum (not a bool, not a float)."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_ints(name: str, value: Any, lengths: Sequence[int], minimum: int = 1) -> tuple[int, ...]:
    """`value` as a tuple of ints, or a ValueError unless it is a list/tuple of `lengths` integers >= minimum."""
    if not (isinstance(value, (list, tuple)) and len(value) in lengths and all(_is_int(v) for v in value)
            and min(value) >= minimum):
        count = " or ".join(str(n) for n in lengths)
        raise ValueError(f"{name} must be {count} integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)


def check_size(name: str, value: Any) -> int | tuple[int, int]:
    """An image side: an integer >= 1, or an (H, W) pair of them (a list becomes a tuple)."""
    if isinstance(value, (list, tuple)):
        if not (len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)):
            raise ValueError(f"{name} must be an integer >= 1 or an (H, W) pair of them, got {value!r}")
        return (int(value[0]), int(value[1]))
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or an (H, W) pair of them, got {value!r}")
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    """`value` as a bool, or a ValueError unless it is True or False (0 and 1 pass; a string does not)."""
    if not (isinstance(value, bool) or (_is_int(value) and value in (0, 1))):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_number(name: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """A ValueError unless `value` is a finite real number (not a bool) for which `ok` holds."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_common_options(cfg: Any) -> None:
    """Check (and normalise: ints, bools, an img_size list as a tuple) the options every family's config
    has: img_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate,
    drop_path_rate, global_pool, dynamic_img_size. Raises ValueError naming the option, value and range."""
    cfg.img_size = check_size("img_size", cfg.img_size)
    for name in ("in_chans", "embed_dim", "depth", "num_heads"):
        setattr(cfg, name, check_int(name, getattr(cfg, name)))
    cfg.num_classes = check_int("num_classes", cfg.num_classes, minimum=0)  # 0: no classifier (timm's way)
    check_number("mlp_ratio", cfg.mlp_ratio, lambda r: r > 0, "a finite number > 0")
    if int(cfg.embed_dim * cfg.mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must leave the MLP a hidden unit (embed_dim * mlp_ratio >= 1), got "
                         f"mlp_ratio={cfg.mlp_ratio!r} with embed_dim={cfg.embed_dim}")
    for name in ("drop_rate", "drop_path_rate"):
        check_number(name, getattr(cfg, name), lambda p: 0 <= p < 1, "a number in [0, 1)")
    for name in ("qkv_bias", "dynamic_img_size"):
        setattr(cfg, name, check_flag(name, getattr(cfg, name)))
    if cfg.global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {cfg.global_pool!r}")


def pretrained_cfg(**kwargs) -> dict:
    """timm's pretrained cfg of a revvit model: ImageNet input and normalisation unless told otherwise."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        **kwargs,
    }


def init_weights_official(module: nn.Module) -> None:
    """The official Rev-ViT/Rev-MViT init: trunc_normal(0.02) weights, biases 0.02, LayerNorm weight 1."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.weight, 1.0)
        nn.init.constant_(module.bias, 0.02)


# -- official SlowFast keys -----------------------------------------------------------------------

_LAYER = re.compile(r"^rev_backbone\.layers\.(\d+)\.(.+)$")
_CLASS_TOKEN_KEYS = ("cls_token", "pos_embed_class")
_SAME_NAME = ("pos_embed", "pos_embed_spatial", "pos_embed_temporal")


def is_official_state_dict(state: Mapping[str, Tensor]) -> bool:
    """Whether `state` has official SlowFast key names (rather than revvit's)."""
    return any(k.removeprefix("module.").startswith(("rev_backbone.", "head.projection.")) for k in state)


def _clean_key(key: str) -> str:
    """Strip the DistributedDataParallel prefix and activation-checkpoint wrapper names."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key.replace("_checkpoint_wrapped_module.", "")


def _rename_layer_rest(rest: str, transition: bool) -> Optional[str]:
    """The part of an official layer key after `rev_backbone.layers.{i}.` in revvit's naming."""
    for old, new in (("F.", "f."), ("G.", "g.")):
        if rest.startswith(old):
            return new + rest[len(old):]
    if transition:
        if rest.startswith("pre_q_fuse.fuse_fn."):
            return "fuse.mlp." + rest[len("pre_q_fuse.fuse_fn."):]
        if rest.startswith("res_proj."):
            return rest
    return None


def _rename(key: str, layer_names: Sequence[str], transitions: set[int]) -> Optional[str]:
    match = _LAYER.match(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index >= len(layer_names):
            return None
        rest = _rename_layer_rest(rest, index in transitions)
        return None if rest is None else f"{layer_names[index]}.{rest}"
    if key.startswith("head.projection."):
        return "head." + key[len("head.projection."):]
    if key in _SAME_NAME or key.startswith(("patch_embed.proj.", "norm.")):
        return key
    return None


# (revvit key, official tensor, the model's state dict) -> {revvit key: tensor} for a key the model lacks
# under that name (a family's own layout difference, e.g. Rev-ViT's split of a fused qkv), or None.
Reshape = Callable[[str, Tensor, Mapping[str, Tensor]], Optional[dict]]


def rename_official_keys(state: Mapping[str, Tensor], model: nn.Module, layer_names: Sequence[str],
                            transitions: Sequence[int] = (), skip_class_token: bool = False,
                            reshape: Optional[Reshape] = None) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an official state dict to `model`'s keys; official layer i lives in module `layer_names[i]`.

    Returns (renamed, official keys with no place): a renamed key the model does not have is reported
    under its official name. `skip_class_token` drops `cls_token` / `pos_embed_class` (for a config with
    MVIT.CLS_EMBED_ON, which the official reversible model cannot use: its loader skips weights the
    model lacks).
    """
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        key = _clean_key(key)
        if skip_class_token and key in _CLASS_TOKEN_KEYS:
            continue
        new = _rename(key, layer_names, set(transitions))
        if new is not None and new not in own and reshape is not None:
            parts = reshape(new, value, own)
            if parts is not None:
                out.update(parts)
                continue
        if new is None or new not in own:
            unused.append(key)
            continue
        out[new] = value
    return out, unused


def filter_official(state_dict: dict, model: nn.Module,
                               to_revvit: Callable[..., tuple[dict, list]]) -> dict:
    """timm's pretrained hook, shared by the families: an official SlowFast state dict (or a whole `.pyth`
    dict) renamed by the family's `to_revvit(state, model, skip_class_token=True)`; a state dict in our
    format passes through. An official key with no place in `model` is refused by name."""
    state_dict = state_dict.get("model_state", state_dict)
    if not is_official_state_dict(state_dict):
        return state_dict
    mapped, unused = to_revvit(state_dict, model, skip_class_token=True)
    if unused:
        raise ValueError(f"official checkpoint keys with no place in {type(model).__name__}: {sorted(unused)}")
    return mapped
