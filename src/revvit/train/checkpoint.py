"""Checkpoints: atomic writes, keep-last-K plus best, resume with fallback, RNG states, final weights.

A training checkpoint `ckpt_<global step>.pt` holds model, optimizer, scheduler, scaler and EMA states,
the position (epoch, batches consumed in it, global step), the metric history, the config, and every
random generator (python, numpy, torch CPU, CUDA) as tensors and plain types, so that
`torch.load(weights_only=True)` reads it. The sampler needs no state of its own: each epoch's permutation
is a function of (seed, epoch), and resuming skips the consumed batches.

Never written: a checkpoint or weights file holding a non-finite tensor (`save_checkpoint` refuses it, the
last good one stays). A checkpoint that fails to load when resuming (truncated, corrupt, or holding pickled
code, which is refused, never run) is renamed `<name>.refused`: it is named, kept for inspection, and no
longer counts toward `keep_last`, so rotation keeps that many good ones.

Writes are atomic (`revvit.io.atomic_write`: a temporary file in the same directory, flush + fsync,
`os.replace`, fsync of the directory). A crash at any moment leaves either the old file set or the new
one, never a truncated checkpoint under a final name. The final weights are revvit weight files, written
and read by `revvit.interop` (`save`, `read_metadata`, `load`) like every other.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import timm
import torch
from torch import nn

from .. import interop
from ..io import CheckpointError, atomic_write, remove_stale_temps
from .parts import TrainError

__all__ = ["atomic_write", "atomic_save", "save_checkpoint", "list_checkpoints", "load_latest", "CheckpointError",
           "rng_state", "set_rng_state", "load_model", "BEST", "WEIGHTS", "EMA_WEIGHTS", "non_finite",
           "check_output_dir", "prepare_output_dir", "load_model_state", "REFUSED"]

BEST = "best.pt"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
REFUSED = ".refused"  # suffix given to a checkpoint that failed to load on resume
_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


# -- the output folder ---------------------------------------------------------------------------------
def check_output_dir(out_dir: Path) -> None:
    """TrainError unless `out_dir` is a folder this process can write, or can be created as one; creates
    nothing (a run whose settings fail later leaves no empty folder)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"--output {out_dir} is a file, not a folder: give a folder for the run (new or a run's own)")
    existing = next(p for p in [out_dir, *out_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise TrainError(f"--output {out_dir}: {existing} is a file, so no folder can be created under it; "
                         "choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--output {out_dir}: {existing} is not writable (permission denied); "
                         "choose a folder you can write, or fix its permissions")


def prepare_output_dir(out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Create the run folder and delete the temporary files a killed checkpoint write left in it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temps(out_dir)
    if removed:
        log(f"removed {len(removed)} temporary file(s) of an interrupted write: {', '.join(removed)}")


def non_finite(tensors: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list structure holding a NaN or an infinity."""
    if isinstance(tensors, torch.Tensor):
        return [prefix or "tensor"] if tensors.is_floating_point() and not bool(torch.isfinite(tensors).all()) else []
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors) \
        if isinstance(tensors, (list, tuple)) else ()
    return [n for k, v in items for n in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]


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
    """Write `ckpt_<step>.pt` atomically, copy it to best.pt when best, delete older ones beyond K.
    CheckpointError, writing nothing, when a tensor of `state` is not finite."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{step:08d}.pt"
    bad = non_finite({k: state[k] for k in ("model", "optimizer", "ema") if state.get(k) is not None})
    if bad:
        raise CheckpointError(path, f"refused to write: {len(bad)} tensor(s) hold NaN or infinity ({', '.join(bad[:3])}"
                              + (", ..." if len(bad) > 3 else "") + "); the last good checkpoint is kept",
                              "The run diverged: lower lr, or use gradient clipping (clip_grad=1.0).")
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
        except Exception as e:  # truncated zip, pickled code, wrong content
            # torch names what weights_only refused ("Unsupported global" / "Weights only load failed")
            code = isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()
            why = ("holds pickled code (Python objects beyond tensors and plain data), refused: revvit never runs "
                   "code from a checkpoint" if code else
                   f"is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            refused = path.with_name(path.name + REFUSED)
            os.replace(path, refused)  # out of the rotation: keep_last counts good checkpoints only
            log(f"warning: checkpoint {path} {why}; renamed to {refused.name}, falling back to the previous one")
    raise CheckpointError(out_dir, f"no usable checkpoint: all of {[p.name for p in candidates]} failed to load")


def load_model_state(model: nn.Module, state: dict, path: Path, model_name: str, model_kwargs: dict,
                     load: Optional[Callable[[nn.Module, dict], Any]] = None) -> None:
    """Load a training checkpoint's weights into the run's model (with `load(model, weights)`, default
    `model.load_state_dict`); CheckpointError naming the differences (model, model_kwargs) when the
    checkpoint was written for another architecture."""
    try:
        (load or nn.Module.load_state_dict)(model, state["model"])
    except (RuntimeError, KeyError) as e:
        theirs, kw = state.get("model_name"), dict(state.get("model_kwargs") or {})
        diff = {k: (kw.get(k), v) for k, v in model_kwargs.items() if kw.get(k) != v}
        what = (f"model {theirs}, this run {model_name}" if theirs != model_name
                else "; ".join(f"{k} {a} in the checkpoint, {b} in this run" for k, (a, b) in diff.items()))
        detail = what if theirs != model_name or diff else str(e).splitlines()[-1].strip()
        raise CheckpointError(path, f"written for another architecture ({detail})",
                              "Resume with the settings the run was started with, or choose another --output.") \
            from None


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
