"""Official SlowFast checkpoints (Rev-ViT, Rev-MViT) -> revvit models with the same outputs.

    model = revvit.load_slowfast("REV_VIT_S.pyth")      # eval mode, returns logits (B, classes)

A SlowFast checkpoint is a torch pickle of a dict: `model_state` (the state dict), `cfg` (the YAML of
the training config), `epoch`, `optimizer_state`. It is read with `torch.load(weights_only=True)`:
tensors and plain data only, no code runs. The config, merged over the official defaults, decides the
architecture (`slowfast_config.read_arch`); every official key is then mapped to exactly one key of the
model by the model family's own `official_to_revvit` (the renaming its timm `checkpoint_filter_fn` uses),
and every model key must be filled, with the right shape, or nothing is loaded.
"""
from __future__ import annotations

import os
import pickle
import re
import types
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..models import mvit, vit
from .errors import CheckpointError
from .slowfast_config import UnsupportedConfig, merge_defaults, parse_cfg, read_arch

__all__ = ["load_slowfast", "load_slowfast_with_info", "read_checkpoint", "load_mapped", "build_family_model",
           "MODEL_FAMILIES"]


# -- safe reading ---------------------------------------------------------------------------------

class _PlainCfgNode(dict):
    """Stands in for a pickled yacs/fvcore `CfgNode` (a dict subclass): rebuilt as a plain dict of its
    items. Its pickled attributes (mutability flags) are dropped; no code of those libraries runs."""

    def __setstate__(self, state: Any) -> None:
        pass


_CFG_NODES = {("yacs.config", "CfgNode"), ("fvcore.common.config", "CfgNode")}
# What a torch.save of tensors and containers refers to by name (storages are resolved by torch itself).
_TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                   ("torch._utils", "_rebuild_parameter_with_state"), ("collections", "OrderedDict"),
                   ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _CfgNodeUnpickler(pickle.Unpickler):
    """A restricted unpickler: tensors, containers, and yacs/fvcore CfgNodes rebuilt as plain dicts.

    Every global a pickle refers to passes through `find_class`; anything not listed is refused, so no
    function or class of the file's choosing is ever called (the standard restricted-unpickler pattern).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CFG_NODES:
            return _PlainCfgNode
        if (module, name) in _TENSOR_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _restricted_pickle_module() -> Any:
    module = types.ModuleType("revvit_restricted_pickle")
    module.Unpickler = _CfgNodeUnpickler
    module.load = lambda f, **kw: _CfgNodeUnpickler(f, **kw).load()
    return module


_UNSAFE_HINT = ("revvit reads checkpoints with torch.load(weights_only=True) and never runs code stored in a "
                "file. If you trust this file, re-save it with plain data only, e.g.:\n"
                "    ckpt = torch.load(path, weights_only=False)  # only for a file you trust\n"
                "    torch.save({'model_state': ckpt['model_state'], 'cfg': ckpt['cfg'].dump() if hasattr("
                "ckpt['cfg'], 'dump') else ckpt['cfg']}, 'clean.pyth')")


def read_checkpoint(path: os.PathLike | str) -> Any:
    """Load a torch pickle with tensors and plain data only (`weights_only=True`, map to CPU).

    A pickled yacs/fvcore CfgNode (which `weights_only` refuses) is rebuilt as a plain dict by a
    restricted unpickler that admits nothing else. Raises CheckpointError for a missing, truncated,
    corrupt or non-torch file, and for one that holds other Python objects.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(path, "no such file", "Check the path; the official files are listed in the README "
                              "(section 'Official weights').")
    if not os.path.isfile(path):
        raise CheckpointError(path, "not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes)", "Download it again.")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "CfgNode" not in str(e):
                raise
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text:
            names = ", ".join(sorted(set(re.findall(r"GLOBAL\s+([\w.]+)", text)))) or "unknown"
            raise CheckpointError(path, f"the checkpoint contains Python objects other than tensors and plain data "
                                  f"({names}); loading them would run code from the file", _UNSAFE_HINT) from None
        raise _corrupt(path, size, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise _corrupt(path, size, e) from None


def _corrupt(path: str, size: int, e: BaseException) -> CheckpointError:
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:  # torch's wrapper text around the actual reason
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    reason = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
    what = f"{type(e).__name__}: {reason[:160]}"
    return CheckpointError(path, f"not a readable PyTorch checkpoint ({size} bytes; {what})",
                           "The file is truncated, corrupt or not a torch.save file. Download it again and "
                           "compare its size with the published one.")


def _entries(ckpt: Any, path: str) -> tuple[dict, Any]:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(path, f"expected a SlowFast checkpoint (a dict with 'model_state' and 'cfg'), got "
                              f"a {type(ckpt).__name__}")
    missing = [k for k in ("model_state", "cfg") if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"not a SlowFast checkpoint: no {' or '.join(repr(k) for k in missing)} entry "
                              f"(top-level keys: {sorted(map(str, ckpt))[:20]})",
                              "revvit.load_slowfast reads the .pyth files of the SlowFast model zoo; for revvit's own "
                              "files use revvit.load.")
    state = ckpt["model_state"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(path, "'model_state' is not a state dict (a mapping of names to tensors)")
    return dict(state), ckpt["cfg"]


# -- model families -------------------------------------------------------------------------------

class Family(NamedTuple):
    """A revvit model family an official config can describe: its class, config and official key renaming."""
    cls: type
    config: type
    official_to_revvit: Callable[..., tuple[dict[str, Tensor], list[str]]]


MODEL_FAMILIES = {
    "RevViT": Family(vit.RevViT, vit.RevViTConfig, vit.official_to_revvit),
    "RevMViT": Family(mvit.RevMViT, mvit.MViTConfig, mvit.official_to_revvit),
}


def build_family_model(family: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Instantiate a revvit model family ("RevViT", "RevMViT") from constructor kwargs."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown revvit model family {family!r}; known: {sorted(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[family].cls(**dict(kwargs))


# -- loading --------------------------------------------------------------------------------------

def _listing(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_mapped(model: nn.Module, mapped: Mapping[str, Tensor], unused: list[str], path: Optional[str],
                overrides: Mapping[str, Any] = ()) -> None:
    """Copy `mapped` into `model` only if it fills every key with the right shape and nothing is left over."""
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    unexpected = list(unused) + [k for k in mapped if k not in own]
    wrong = [f"{k} {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model weight(s) missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint key(s) with no place in the model: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listing(wrong, 6)}")
    if problems:
        hint = "Nothing was loaded. The checkpoint does not match the architecture its config describes"
        if overrides:
            hint += f" with your overrides {dict(overrides)}"
            if "num_classes" in overrides:
                hint += ("; to use another number of classes, load without num_classes and call "
                         "model.reset_classifier(num_classes)")
        hint += "."
        raise CheckpointError(path, "cannot map the weights completely: " + "; ".join(problems), hint)
    model.load_state_dict({k: mapped[k] for k in own}, strict=True)


# -- the entry point ------------------------------------------------------------------------------

def load_slowfast(path: os.PathLike | str, **overrides: Any) -> nn.Module:
    """Build the revvit model an official SlowFast checkpoint describes and load its weights exactly.

    Works for the SlowFast model zoo's REV_VIT_S/B.pyth (-> RevViT), REV_MVIT_B.pyth and
    REV_MVIT_B_16x4.pyth (-> RevMViT), and any other size or layout of those models the official config
    can express (depth, width, heads, Q/KV pooling, transition layers, avg or concat_linear fusion,
    separate or fused qkv, with or without bias, image or video stem, classes, frames, crop size).

    The model is returned in eval mode and returns **logits** (B, num_classes): the official head applies
    a softmax in eval mode, so `model(x).softmax(-1)` gives the official output. Inputs are what the
    official test code feeds: normalised images (B, 3, H, W) or clips (B, 3, T, H, W) at the config's
    crop size and frame count.

    `overrides` are constructor kwargs applied on top of the ones read from the config, e.g.
    `drop_path_rate=0.0` for fine-tuning; they must not change any weight shape (to change the number
    of classes, load first and call `model.reset_classifier(n)`).

    Raises CheckpointError (a ValueError naming the file, the problem and the fix) for unreadable files,
    non-SlowFast files, configs revvit cannot reproduce exactly, and any key or shape that does not map;
    the model is then not returned and nothing is written anywhere.
    """
    return load_slowfast_with_info(path, **overrides)[0]


def load_slowfast_with_info(path: os.PathLike | str, **overrides: Any) -> tuple[nn.Module, dict]:
    """`load_slowfast`, plus {"cfg": the merged official config, "epoch", "family", "kwargs", "notes"}."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    state, cfg = _entries(ckpt, path)
    try:
        merged = merge_defaults(parse_cfg(cfg))
        spec = read_arch(merged)
    except UnsupportedConfig as e:
        raise CheckpointError(path, str(e), "revvit only loads configs whose math it reproduces exactly.") from None
    except ValueError as e:
        raise CheckpointError(path, f"cannot read the embedded config: {e}") from None
    family = spec.family
    if family not in MODEL_FAMILIES:
        raise CheckpointError(path, f"the config describes a {family}, which this revvit install does not provide")
    kwargs = {**spec.kwargs, **overrides}
    try:
        model = build_family_model(family, kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"cannot build the {family} the config describes ({e})",
                              f"kwargs read from the config: {spec.kwargs}; overrides: {overrides}") from None
    to_revvit = MODEL_FAMILIES[family].official_to_revvit
    mapped, unused = to_revvit(state, model, skip_class_token=bool(merged["MVIT"]["CLS_EMBED_ON"]))
    load_mapped(model, mapped, unused, path, overrides)
    info = {"cfg": merged, "epoch": ckpt.get("epoch"), "family": family, "kwargs": kwargs, "notes": list(spec.notes)}
    return model.eval(), info
