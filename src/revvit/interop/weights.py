"""revvit weights as safetensors: save, load, convert official checkpoints.

    revvit.save(model, "rev_vit_s.safetensors")
    model = revvit.load("rev_vit_s.safetensors")          # or an official .pyth: revvit.load_slowfast
    revvit.interop.convert("REV_VIT_S.pyth", "rev_vit_s.safetensors")   # `revvit convert SRC DST`

The file holds the model's own `state_dict()` under its own key names (so timm's loader takes it as is)
and string metadata: "format" ("revvit"), "model" (a registered timm name of the family), "model_kwargs"
(JSON of the constructor kwargs: with the name, enough to rebuild the model), "revvit_version", and for
converted files "source" and "slowfast_cfg" (the merged official config, JSON). The same metadata keys
are written by `revvit train`, so each side reads the other's files.

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

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Callable, Mapping, Optional

from torch import nn

from .errors import CheckpointError
from .slowfast import load_mapped

__all__ = ["save", "load", "convert", "read_metadata", "add_convert_subcommand", "run_convert", "model_spec"]

FORMAT = "revvit"


def _version() -> str:
    from .. import __version__
    return __version__


# -- what identifies a model ----------------------------------------------------------------------

def _default_name(model: nn.Module) -> str:
    from ..models.vit import RevViT
    if isinstance(model, RevViT):
        return "rev_vit_base_patch16_224"
    try:
        from ..models.mvit import MViT, RevMViT
    except ImportError:  # pragma: no cover
        RevMViT = MViT = ()  # type: ignore[assignment]
    video = not getattr(getattr(model, "cfg", None), "patch_2d", True)
    if isinstance(model, RevMViT):
        return "rev_mvit_base_16x4" if video else "rev_mvit_base"
    if isinstance(model, MViT):
        return "mvit_base_16x4" if video else "mvit_base"
    raise TypeError(f"revvit.save takes revvit models (RevViT, RevMViT, MViT), got {type(model).__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


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
    return name, _jsonable(kwargs)


# -- atomic writing -------------------------------------------------------------------------------

def atomic_write(path: os.PathLike | str, write: Callable[[Any], None]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, make it durable (fsync of file and
    folder), then rename it over `path`: a crash at any moment leaves the old file or the new one, never a
    truncated one, and a failed write removes its temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(str(path), f"the folder {folder!r} does not exist", "Create it first.")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- save / load ----------------------------------------------------------------------------------

def save(model: nn.Module, path: os.PathLike | str, extra_metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write `model`'s weights and what rebuilds it to a .safetensors file (atomically).

    Tensors are stored under `model.state_dict()`'s own names, on CPU, in their own dtype.
    """
    from safetensors.torch import save as st_save

    path = os.fspath(path)
    name, kwargs = model_spec(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": name, "model_kwargs": json.dumps(kwargs, sort_keys=True),
            "revvit_version": _version()}
    meta.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    data = st_save(tensors, metadata=meta)
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
    from safetensors import SafetensorError, safe_open

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
        meta["model_kwargs"] = json.loads(meta["model_kwargs"])
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"the 'model_kwargs' metadata is not JSON ({e})") from None
    if "slowfast_cfg" in meta:
        try:
            meta["slowfast_cfg"] = json.loads(meta["slowfast_cfg"])
        except json.JSONDecodeError:
            pass
    return meta


def _load_safetensors(path: str, overrides: Mapping[str, Any]) -> nn.Module:
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .. import models  # noqa: F401  (registers the revvit models with timm)

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


def load(path: os.PathLike | str, **overrides: Any) -> nn.Module:
    """Load a model, in eval mode, returning logits.

    A .safetensors file written by revvit (`revvit.save`, `revvit convert`, `revvit train`) is rebuilt
    from its metadata; an official SlowFast .pyth goes through `revvit.load_slowfast`. `overrides` are
    constructor kwargs on top of the stored ones; they must not change weight shapes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file")
    if path.endswith(".safetensors") or _is_safetensors(path):
        return _load_safetensors(path, overrides)
    from .slowfast import load_slowfast
    return load_slowfast(path, **overrides)


# -- conversion -----------------------------------------------------------------------------------

def convert(src: os.PathLike | str, dst: os.PathLike | str, overwrite: bool = False) -> nn.Module:
    """Official SlowFast checkpoint `src` (.pyth) -> revvit .safetensors `dst`; returns the loaded model.

    The whole source is read, mapped and checked before anything is written; `dst` is then replaced
    atomically. An existing `dst` is kept unless `overwrite`.
    """
    from .slowfast import load_slowfast_with_info

    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise CheckpointError(dst, "the destination is the source file", "Choose another destination.")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(dst, "the destination exists",
                              "Pass overwrite=True (revvit convert --force) to replace it.")
    if not dst.endswith(".safetensors"):
        raise CheckpointError(dst, "the destination must end in .safetensors (timm recognises the format by it)")
    model, info = load_slowfast_with_info(src)
    extra = {"source": os.path.basename(src), "slowfast_cfg": json.dumps(_jsonable(info["cfg"]), sort_keys=True)}
    save(model, dst, extra_metadata=extra)
    return model


def add_convert_subcommand(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register `revvit convert SRC DST [--force]` on an argparse subparsers object; run it with
    `run_convert(args)` (also set as the parser's `func` default)."""
    p = subparsers.add_parser("convert", help="convert an official SlowFast checkpoint (.pyth) to .safetensors",
                              description="Load an official Rev-ViT / Rev-MViT checkpoint exactly and write revvit "
                                          "weights plus metadata (model name and kwargs) as .safetensors.")
    p.add_argument("src", help="official checkpoint, e.g. REV_VIT_S.pyth")
    p.add_argument("dst", help="output file, ending in .safetensors")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command: 0 on success, 1 with a message on stderr otherwise."""
    try:
        model = convert(args.src, args.dst, overwrite=args.force)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"revvit convert: error: {e}", file=sys.stderr)
        return 1
    name, kwargs = model_spec(model)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {type(model).__name__} ({n / 1e6:.1f}M parameters, {kwargs['num_classes']} classes), "
          f"timm name {name}")
    return 0

