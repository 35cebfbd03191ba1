"""revvit weights as safetensors: save, load, convert official checkpoints.

    revvit.save(model, "rev_vit_s.safetensors")
    model = revvit.load("rev_vit_s.safetensors")          # or an official .pyth: revvit.load_slowfast
    revvit.interop.convert("REV_VIT_S.pyth", "rev_vit_s.safetensors")   # `revvit convert SRC DST`

The file holds the model's own `state_dict()` under its own key names (so timm's loader takes it as is)
and metadata: "format" ("revvit"), "model" (a registered timm name: the one the model was built by, else
the variant whose default architecture it has, else the family's base variant, `model_spec`), "model_kwargs" (the
constructor kwargs: with the name, enough to rebuild the model), "revvit_version", for converted files
"source" and "slowfast_cfg" (the merged official config), for trained ones "config" and "class_names".
safetensors metadata values are strings: a string is stored as it is, any other value as JSON, and the
keys stored as JSON are listed (JSON) under "json_fields"; `read_metadata` returns them decoded. `save`
and `read_metadata` are the one writer and reader of these files: `revvit train` writes its
model.safetensors with them too.

timm can load a converted file with the kwargs from its metadata:

    meta = revvit.interop.read_metadata(DST)
    kw = meta["model_kwargs"]
    model = timm.create_model(meta["model"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=DST, num_classes=kw["num_classes"]), **kw)

(`num_classes` in the overlay stops timm from discarding a head whose size differs from the default
pretrained config.) Every write goes to a temporary file in the destination folder and is renamed over
the destination only once complete: a failure never leaves a partial or damaged file behind.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Optional

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .. import __version__
from ..io import CheckpointError, atomic_write, plain_data
from ..models import MViT, RevMViT, RevViT  # also registers the revvit models with timm
from .slowfast import load_mapped, load_slowfast, load_slowfast_with_info

__all__ = ["save", "load", "convert", "read_metadata", "model_spec"]

FORMAT = "revvit"
JSON_FIELDS = "json_fields"
# Keys that files written before "json_fields" existed hold as JSON (model_kwargs, convert's slowfast_cfg,
# `revvit train`'s config and class_names): decoded whether listed or not.
_ALWAYS_JSON = ("model_kwargs", "slowfast_cfg", "config", "class_names")


# -- what identifies a model ----------------------------------------------------------------------

# Options a run chooses (input geometry, classes, regularisation, pooling), which do not make another variant:
# Rev-ViT-S at 384 px with 10 classes is still rev_vit_small_patch16_224. stage_depths is shorthand for the
# depth and per-layer options compared anyway.
_RUN_OPTIONS = frozenset({"img_size", "in_chans", "num_classes", "drop_rate", "drop_path_rate", "global_pool",
                          "dynamic_img_size", "stage_depths"})


def _architecture(model: nn.Module) -> dict:
    """What makes `model` the variant it is: its config less the run options, the transitions as built."""
    arch = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in _RUN_OPTIONS}
    if isinstance(arch.get("patch_size"), int):
        arch["patch_size"] = (arch["patch_size"],) * 2
    if "transition_layers" in arch:  # None (derived) and the explicit list it derives are the same layout
        arch["transition_layers"] = tuple(s.index for s in model.specs if s.transition)
    return arch


@functools.lru_cache(maxsize=None)
def _variant(name: str) -> tuple[type, dict]:
    """The class and `_architecture` of registered model `name` at its defaults (built on the meta device:
    no memory, but a fraction of a second of init, hence the cache)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    return type(model), _architecture(model)


def _matching_variant(model: nn.Module) -> Optional[str]:
    """The registered model of `model`'s class whose default architecture is `model`'s, if any."""
    arch = _architecture(model)
    for name in sorted(timm.list_models()):
        if timm.models.model_entrypoint(name).__module__ != type(model).__module__:
            continue
        cls, variant = _variant(name)
        if cls is type(model) and variant == arch:
            return name
    return None


def _default_name(model: nn.Module) -> str:
    """The timm name recorded for `model` when it was not built by name: the registered variant whose defaults
    are its architecture, else the family's base variant of the same input kind (image or video, whose
    pretrained cfg gives the normalisation); the kwargs, which hold the whole architecture, rebuild it."""
    if not isinstance(model, (RevViT, RevMViT, MViT)):
        raise TypeError(f"revvit.save takes revvit models (RevViT, RevMViT, MViT), got {type(model).__name__}")
    name = _matching_variant(model)
    if name is not None:
        return name
    if isinstance(model, RevViT):
        return "rev_vit_base_patch16_224"
    video = "_16x4" if not model.cfg.patch_2d else ""
    return ("rev_mvit_base" if isinstance(model, RevMViT) else "mvit_base") + video


def _tuplify(value: Any) -> Any:
    """JSON lists back to the tuples the model configs use."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def model_spec(model: nn.Module) -> tuple[str, dict]:
    """(registered timm name, constructor kwargs) that rebuild `model`'s architecture exactly."""
    cfg = getattr(model, "cfg", None)
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"revvit.save takes revvit models (with a .cfg dataclass), got {type(model).__name__}")
    kwargs = dataclasses.asdict(cfg)
    # the classifier may have been replaced after construction
    kwargs["num_classes"] = int(getattr(model, "num_classes", kwargs.get("num_classes", 0)))
    if "global_pool" in kwargs and hasattr(model, "global_pool"):
        kwargs["global_pool"] = model.global_pool
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    name = pretrained_cfg.get("architecture") or _default_name(model)
    return name, plain_data(kwargs)


# -- save / load ----------------------------------------------------------------------------------

def _encode(meta: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as safetensors stores it (strings): strings as they are, other values as JSON, their keys
    listed under "json_fields"."""
    out, as_json = {}, []
    for key, value in meta.items():
        if isinstance(value, str):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(plain_data(value), sort_keys=True)
            as_json.append(str(key))
    out[JSON_FIELDS] = json.dumps(sorted(as_json))
    return out


def save(model: nn.Module, path: os.PathLike | str, extra_metadata: Optional[Mapping[str, Any]] = None, *,
         model_name: Optional[str] = None, model_kwargs: Optional[Mapping[str, Any]] = None,
         state_dict: Optional[Mapping[str, Tensor]] = None) -> None:
    """Write `model`'s weights and what rebuilds it to a .safetensors file (atomically).

    Tensors are stored under `model.state_dict()`'s own names, on CPU, in their own dtype. The timm name
    and kwargs are `model_spec(model)`'s unless given (`revvit train` gives the ones it built the model
    with). `extra_metadata` values may be strings or anything JSON can hold. `state_dict`: the weights to
    write instead of `model.state_dict()` (e.g. a sharded model's, gathered).
    """
    path = os.fspath(path)
    if model_name is None or model_kwargs is None:
        spec_name, spec_kwargs = model_spec(model)
        model_name = spec_name if model_name is None else model_name
        model_kwargs = spec_kwargs if model_kwargs is None else model_kwargs
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(path, f"refused to write weights holding NaN or infinity ({len(bad)} tensor(s): "
                              f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})",
                              "Nothing was written; the model diverged.")
    meta = {"format": FORMAT, "model": model_name, "model_kwargs": dict(model_kwargs), "revvit_version": __version__,
            **(extra_metadata or {})}
    data = safetensors_bytes(tensors, metadata=_encode(meta))
    atomic_write(path, lambda f: f.write(data))


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def read_metadata(path: os.PathLike | str) -> dict:
    """The metadata of a revvit .safetensors file, JSON fields decoded ("model_kwargs" is a dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({type(e).__name__}: {e})",
                              "The file is truncated or corrupt; write it again (revvit.save / revvit convert)."
                              ) from None
    if "model" not in meta or "model_kwargs" not in meta:
        raise CheckpointError(path, "a safetensors file without revvit metadata ('model', 'model_kwargs')",
                              "Build the model yourself and call "
                              "model.load_state_dict(safetensors.torch.load_file(path)).")
    try:
        listed = json.loads(meta.pop(JSON_FIELDS, "[]"))
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"the '{JSON_FIELDS}' metadata is not JSON ({e})") from None
    for key in set(listed) | set(_ALWAYS_JSON):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise CheckpointError(path, f"the '{key}' metadata is not JSON ({e})") from None
    return meta


def _load_safetensors(path: str, overrides: Mapping[str, Any]) -> nn.Module:
    meta = read_metadata(path)
    name = meta["model"]
    if not timm.is_model(name):
        raise CheckpointError(path, f"the model {name!r} named in the metadata is not a registered timm model",
                              "It was written by another revvit version; upgrade revvit.")
    kwargs = {k: _tuplify(v) for k, v in meta["model_kwargs"].items()}
    kwargs.update(overrides)
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"cannot build {name} from the metadata kwargs ({e})") from None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"cannot read the tensors ({type(e).__name__}: {e})",
                              "The file is truncated or corrupt; write it again.") from None
    load_mapped(model, tensors, [], path, overrides)
    return model.eval()


def _load_training_checkpoint(path: str, overrides: Mapping[str, Any]) -> nn.Module:
    """A `revvit train` checkpoint (ckpt_<step>.pt, best.pt): its "model_name", "model_kwargs" and "model"."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle
        raise CheckpointError(path, f"cannot read the checkpoint ({type(e).__name__}: {e})") from None
    if not (isinstance(state, dict) and {"model_name", "model_kwargs", "model"} <= set(state)):
        raise CheckpointError(path, "not a revvit training checkpoint (no model_name / model_kwargs / model)")
    kwargs = {**{k: _tuplify(v) for k, v in state["model_kwargs"].items()}, **overrides}
    model = timm.create_model(state["model_name"], **kwargs)
    load_mapped(model, state["model"], [], path, overrides)
    return model.eval()


def load(path: os.PathLike | str, **overrides: Any) -> nn.Module:
    """Load a model, in eval mode, returning logits.

    A .safetensors file written by revvit (`revvit.save`, `revvit convert`, `revvit train`) is rebuilt
    from its metadata; a `revvit train` checkpoint (.pt) from the name and kwargs it records; an official
    SlowFast .pyth goes through `revvit.load_slowfast`. `overrides` are constructor kwargs on top of the
    stored ones; they must not change weight shapes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file")
    if path.endswith(".safetensors") or _is_safetensors(path):
        return _load_safetensors(path, overrides)
    if path.endswith(".pt"):
        return _load_training_checkpoint(path, overrides)
    return load_slowfast(path, **overrides)


# -- conversion -----------------------------------------------------------------------------------

def convert(src: os.PathLike | str, dst: os.PathLike | str, overwrite: bool = False) -> nn.Module:
    """Official SlowFast checkpoint `src` (.pyth) -> revvit .safetensors `dst`; returns the loaded model.

    The whole source is read, mapped and checked before anything is written; `dst` is then replaced
    atomically. An existing `dst` is kept unless `overwrite`.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise CheckpointError(dst, "the destination is the source file", "Choose another destination.")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(dst, "the destination exists",
                              "Pass overwrite=True (revvit convert --force) to replace it.")
    if not dst.endswith(".safetensors"):
        raise CheckpointError(dst, "the destination must end in .safetensors (timm recognises the format by it)")
    if os.path.isfile(src) and (src.endswith(".safetensors") or _is_safetensors(src)):
        read_metadata(src)  # CheckpointError for a truncated or corrupt file, saying so
        raise CheckpointError(src, "is already a revvit .safetensors file; convert takes an official SlowFast "
                              "checkpoint (.pyth)", "Use the file as it is (revvit eval, revvit.load).")
    model, info = load_slowfast_with_info(src)
    save(model, dst, extra_metadata={"source": os.path.basename(src), "slowfast_cfg": info["cfg"]})
    return model
