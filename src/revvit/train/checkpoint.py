"""Checkpoints: atomic writes, keep-last-K plus best, resume with fallback, RNG states, final weights.

A training checkpoint `ckpt_<global step>.pt` holds model, optimizer, scheduler, scaler and EMA states,
the position (epoch, batches consumed in it, global step), the metric history, the config, and every
random generator (python, numpy, torch CPU, CUDA) as tensors and plain types, so that
`torch.load(weights_only=True)` reads it. The sampler needs no state of its own: each epoch's permutation
is a function of (seed, epoch), and resuming skips the consumed batches.

Writes are atomic (`revvit.io.atomic_write`: a temporary file in the same directory, flush + fsync,
`os.replace`, fsync of the directory). A crash at any moment leaves either the old file set or the new
one, never a truncated checkpoint under a final name. The final weights are revvit weight files, written
and read by `revvit.interop` (`save`, `read_metadata`, `load`) like every other.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import timm
import torch
from torch import nn

from .. import interop
from ..io import CheckpointError, atomic_write

__all__ = ["atomic_write", "atomic_save", "save_checkpoint", "list_checkpoints", "load_latest", "CheckpointError",
           "rng_state", "set_rng_state", "load_model", "BEST", "WEIGHTS", "EMA_WEIGHTS"]

BEST = "best.pt"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


# -- random generators -----------------------------------------------------------------------------
def rng_state() -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- training checkpoints --------------------------------------------------------------------------
def list_checkpoints(out_dir: Path) -> list[Path]:
    """Step checkpoints in `out_dir`, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*.pt") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict, out_dir: Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Write `ckpt_<step>.pt` atomically, copy it to best.pt when best, delete older ones beyond K."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{step:08d}.pt"
    atomic_save(state, path)
    if is_best:
        atomic_save(state, out_dir / BEST)
    for old in list_checkpoints(out_dir)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def load_latest(out_dir: Path, log: Callable[[str], None] = print) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that loads; a corrupt or truncated one is reported by name and skipped.
    None when the directory has no checkpoint; CheckpointError when none of them loads."""
    candidates = list_checkpoints(out_dir)
    if not candidates:
        return None
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state or "global_step" not in state:
                raise CheckpointError(path, "not a revvit training checkpoint")
            return path, state
        except Exception as e:  # truncated zip, bad pickle, wrong content
            log(f"warning: checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                "falling back to the previous one")
    raise CheckpointError(out_dir, f"no usable checkpoint: all of {[p.name for p in candidates]} failed to load")


# -- loading for evaluation -------------------------------------------------------------------------
def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, info) from a revvit training checkpoint (.pt), or from anything `revvit.load`
    reads (.safetensors with revvit metadata, official SlowFast .pyth). info has "model", "model_kwargs"
    and, when the file records it, the training "config"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(path, f"cannot read the checkpoint ({type(e).__name__}: {e})") from None
        if not (isinstance(state, dict) and "model_name" in state):
            raise CheckpointError(path, "not a revvit training checkpoint (no model_name)")
        info = {"model": state["model_name"], "model_kwargs": state["model_kwargs"], "config": state.get("config"),
                "class_names": state.get("class_names")}
        model = timm.create_model(info["model"], **info["model_kwargs"])
        model.load_state_dict(state["model"])
        return model.eval(), info
    model = interop.load(path)
    if path.suffix == ".safetensors":
        meta = interop.read_metadata(path)
        info = {"model": meta["model"], "model_kwargs": meta["model_kwargs"], "class_names": meta.get("class_names")}
        if "config" in meta:
            info["config"] = meta["config"]
    else:  # official weights: the input geometry the model was built for
        info = {"model": type(model).__name__,
                "model_kwargs": {k: getattr(model.cfg, k) for k in ("img_size", "in_chans", "num_classes", "num_frames")
                                 if hasattr(getattr(model, "cfg", None), k)}}
    return model, info
