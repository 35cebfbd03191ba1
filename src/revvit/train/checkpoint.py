"""Checkpoints: atomic writes, keep-last-K plus best, resume with fallback, RNG states, final weights.

A training checkpoint `ckpt_<global step>.pt` holds model, optimizer, scheduler, scaler and EMA states,
the position (epoch, batches consumed in it, global step), the metric history, the config, and every
random generator (python, numpy, torch CPU, CUDA) as tensors and plain types, so that
`torch.load(weights_only=True)` reads it. The sampler needs no state of its own: each epoch's permutation
is a function of (seed, epoch), and resuming skips the consumed batches.

Never written: a checkpoint or weights file holding a non-finite tensor (`save_checkpoint` refuses it, the
last good one stays). A checkpoint that fails to load when resuming (truncated, corrupt, or holding pickled
code, which is refused, never run) is renamed `<name>.refused`: it is named, kept for inspection, and no
longer counts toward `keep_last`, so rotation keeps that many good ones. When no step checkpoint loads,
the run resumes from best.pt (never renamed). A folder holding a run's files (`run_files`) is never
trained into afresh, and a start that fails before the first checkpoint removes what it created
(`remove_failed_start`).

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
from ..io import CheckpointError, FolderBefore, atomic_write, remove_created, remove_stale_temps, saved_by_torch
from .parts import TrainError

__all__ = ["atomic_write", "atomic_save", "save_checkpoint", "list_checkpoints", "load_latest", "CheckpointError",
           "rng_state", "set_rng_state", "load_model", "BEST", "WEIGHTS", "EMA_WEIGHTS", "non_finite",
           "check_output_dir", "prepare_output_dir", "load_model_state", "REFUSED", "run_files", "resumable",
           "remove_failed_start", "CONFIG"]

BEST = "best.pt"
CONFIG = "config.yaml"  # the run's settings (`revvit train --config` reruns it)
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


def run_files(out_dir: Path) -> list[str]:
    """What a run left in `out_dir` that a new run there would overwrite or bury: step checkpoints (also
    those set aside as unreadable), best.pt and the final weights."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = {p.name for pattern in ("ckpt_*.pt", "ckpt_*.pt" + REFUSED) for p in out_dir.glob(pattern)}
    return sorted(found | {n for n in (BEST, WEIGHTS, EMA_WEIGHTS) if (out_dir / n).is_file()})


def resumable(out_dir: Path) -> bool:
    """Whether `out_dir` has a checkpoint to resume from: a step checkpoint, or best.pt."""
    return bool(list_checkpoints(out_dir)) or (Path(out_dir) / BEST).is_file()


def remove_failed_start(out_dir: Path, before: FolderBefore) -> list[str]:
    """After a run stopped before writing any checkpoint: remove what it created (config.yaml, logs; the
    folder itself if it made it), keeping what was there before (`before`, from `revvit.io.folder_before`).
    Nothing is removed once the folder holds a run's files. Returns the names removed."""
    if run_files(out_dir):
        return []
    return remove_created(out_dir, before)


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
    """The newest step checkpoint that loads, else best.pt; a corrupt or truncated step checkpoint is reported
    by name and set aside (best.pt is never renamed). None when the directory has neither; CheckpointError
    when none of them loads."""
    candidates = list_checkpoints(out_dir)
    if (Path(out_dir) / BEST).is_file():
        candidates.append(Path(out_dir) / BEST)  # the last resort: the best epoch's full training state
    if not candidates:
        return None
    for i, path in enumerate(candidates):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state or "global_step" not in state:
                raise CheckpointError(path, "not a revvit training checkpoint")
            return path, state
        except Exception as e:  # truncated zip, pickled code, wrong content
            log(f"warning: checkpoint {path} {_why_unreadable(path, e)}; " + _set_aside(path)
                + (f", trying {candidates[i + 1].name}" if i + 1 < len(candidates) else ""))
    raise CheckpointError(out_dir, f"no usable checkpoint: {', '.join(p.name for p in candidates)} failed to load",
                          "Copy a good checkpoint into the folder to resume, or start a new run with another "
                          "--output (unreadable step checkpoints were renamed *.refused).")


def _why_unreadable(path: Path, e: Exception) -> str:
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    # torch names what weights_only refused ("Unsupported global" / "Weights only load failed")
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower() and saved_by_torch(path):
        return ("holds pickled code (Python objects beyond tensors and plain data), refused: revvit never runs "
                "code from a checkpoint")
    first = str(e).splitlines()[0] if str(e) else ""
    return f"is corrupt or truncated ({type(e).__name__}{': ' + first[:160] if first else ''})"


def _set_aside(path: Path) -> str:
    """Rename an unreadable step checkpoint out of the rotation (keep_last counts good ones only); best.pt
    stays where it is."""
    if path.name == BEST:
        return "left in place"
    refused = path.with_name(path.name + REFUSED)
    os.replace(path, refused)
    return f"renamed to {refused.name}"


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
