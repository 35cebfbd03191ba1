"""Checkpoints: atomic writes, keep-last-K plus best, resume with fallback, RNG states, final weights.

A training checkpoint `ckpt_<global step>.pt` holds model, optimizer, scheduler, scaler and EMA states,
the position (epoch, batches consumed in it, global step), the metric history, the config, and every
random generator (python, numpy, torch CPU, CUDA) as tensors and plain types, so that
`torch.load(weights_only=True)` reads it. The sampler needs no state of its own: each epoch's permutation
is a function of (seed, epoch), and resuming skips the consumed batches.

Writes are atomic (`revvit.interop.atomic_write`: a temporary file in the same directory, flush + fsync,
`os.replace`, fsync of the directory). A crash at any moment leaves either the old file set or the new
one, never a truncated checkpoint under a final name.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..interop.weights import atomic_write

__all__ = ["atomic_write", "atomic_save", "save_checkpoint", "list_checkpoints", "load_latest", "CheckpointError",
           "rng_state", "set_rng_state", "save_weights", "load_model", "BEST", "WEIGHTS"]

BEST = "best.pt"
WEIGHTS = "model.safetensors"
_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


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
                raise CheckpointError("not a revvit training checkpoint")
            return path, state
        except Exception as e:  # truncated zip, bad pickle, wrong content
            log(f"warning: checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                "falling back to the previous one")
    raise CheckpointError(f"no usable checkpoint in {out_dir}: all of {[p.name for p in candidates]} failed to load")


# -- final weights and loading for evaluation -------------------------------------------------------
def save_weights(model: nn.Module, path: Path, model_name: str, model_kwargs: dict, extra: Optional[dict] = None) -> None:
    """model.safetensors with metadata {"model": name, "model_kwargs": JSON}: enough to rebuild it."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "revvit", "model": model_name, "model_kwargs": json.dumps(model_kwargs)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def _build(name: str, kwargs: dict) -> nn.Module:
    import timm

    import revvit  # noqa: F401  (registers the models)

    return timm.create_model(name, **kwargs)


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
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
        if not (isinstance(state, dict) and "model_name" in state):
            raise CheckpointError(f"{path} is not a revvit training checkpoint (no model_name)")
        info = {"model": state["model_name"], "model_kwargs": state["model_kwargs"], "config": state.get("config")}
        model = _build(info["model"], info["model_kwargs"])
        model.load_state_dict(state["model"])
        return model.eval(), info
    import revvit

    model = revvit.load(str(path))
    info = {"model": type(model).__name__, "model_kwargs": {}}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        info["model"] = meta.get("model", info["model"])
        info["model_kwargs"] = json.loads(meta.get("model_kwargs", "{}"))
        if "config" in meta:
            info["config"] = json.loads(meta["config"])
    else:  # official weights: the input geometry the model was built for
        info["model_kwargs"] = {k: getattr(model.cfg, k) for k in ("img_size", "in_chans", "num_classes", "num_frames")
                                if hasattr(getattr(model, "cfg", None), k)}
    return model, info
