"""Memory and step time of reversible vs autograd vs activation checkpointing, in one run.

Every figure is a ratio taken within one process on one machine: peak activation memory per sample
(:func:`measure_training_memory`) and the median wall time of a forward+backward step, the candidates
timed round-robin so that machine drift hits them alike.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import timm
import torch
from torch import nn

from ..reversible import compile_blocks
from .memory import measure_training_memory, training_step

__all__ = ["Candidate", "Result", "compare", "vit_candidates", "mvit_candidates", "format_table", "run_benchmark",
           "usable_device"]


@dataclass
class Candidate:
    label: str
    build: Callable[[], nn.Module]  # built lazily, one at a time, to keep peak RAM low
    compiles: bool = True  # has a compiled twin under --compile (not the fused rows: compiled F and G are recomputed)


@dataclass
class Result:
    label: str
    setting: str  # what the candidates of one comparison share, e.g. "depth 12"
    mb_per_sample: float
    step_seconds: float


def usable_device(name: Optional[str]) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:N"; None or "auto": cuda when available, else cpu) as a device this machine
    has; ValueError saying what to give instead (torch's own errors name no option and no remedy)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (e.g. cuda:1), got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False); "
                         "use cpu")
    count = torch.cuda.device_count() if name.startswith("cuda:") else 0
    if name.startswith("cuda:") and int(name[5:]) >= count:
        raise ValueError(f"device {name!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled(candidates: list[Candidate], backend: str = "inductor") -> list[Candidate]:
    """Each candidate, then the same with its blocks compiled (`revvit.reversible.compile_blocks`: F and G of
    the reversible blocks, the blocks of the others), labelled ", compiled"; not for a candidate whose point
    is its fused couplings (`compiles` False): compiled F and G are recomputed, not fused, so its twin would
    be another row's ("recomputed in halves")."""
    twins = [Candidate(f"{c.label}, compiled", lambda build=c.build: compile_blocks(build(), backend=backend))
             for c in candidates if c.compiles]
    return candidates + twins


def compare(candidates: list[Candidate], x: torch.Tensor, setting: str, steps: int = 3) -> list[Result]:
    """Memory of each candidate, then `steps` timed steps of each, interleaved; median step time. The memory
    step is also the warm-up (a compiled candidate compiles there). Only the model being timed holds
    gradients (made before its step, as in training's steady state, and released after it): all the
    models are kept for the interleaving, and at depth 96 their gradients would double what they hold."""
    models, mem = {}, {}
    for c in candidates:
        model = c.build().to(x.device)
        mem[c.label] = measure_training_memory(model, x).mb_per_sample
        model.zero_grad(set_to_none=True)
        models[c.label] = model
    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    for _ in range(steps):
        for c in candidates:
            model = models[c.label]
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if p.requires_grad else None
            _sync(x.device)
            start = time.perf_counter()
            training_step(model, x)
            _sync(x.device)
            times[c.label].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return [Result(c.label, setting, mem[c.label], statistics.median(times[c.label])) for c in candidates]


def vit_candidates(size: str, depth: int, img_size: int) -> list[Candidate]:
    """Rev-ViT reversible: the default (fused couplings, whole batch) and in single images; recomputed under
    autograd as the engine did before fused couplings (its automatic halves, 4 MiB pieces, whole); the same
    model with autograd; timm's ViT, and timm's ViT with checkpointing."""
    rev_name, vit_name = f"rev_vit_{size}_patch16_224", f"vit_{size}_patch16_224"
    kwargs = dict(depth=depth, img_size=img_size, drop_path_rate=0.0)

    def rev(mode: str) -> nn.Module:
        return timm.create_model(rev_name, **kwargs).set_backprop(mode)

    def vit(checkpointing: bool) -> nn.Module:
        model = timm.create_model(vit_name, **kwargs)
        model.set_grad_checkpointing(checkpointing)
        return model

    return [
        Candidate(f"{rev_name} reversible", lambda: rev("reversible"), compiles=False),
        Candidate(f"{rev_name} reversible, single images", lambda: rev("reversible").set_chunking(1), compiles=False),
        Candidate(f"{rev_name} reversible, recomputed in halves",
                  lambda: rev("reversible").set_chunking(None, fused=False)),
        Candidate(f"{rev_name} reversible, recomputed in 4 MiB pieces",
                  lambda: rev("reversible").set_chunking(4 * 2 ** 20, fused=False)),
        Candidate(f"{rev_name} reversible, recomputed whole", lambda: rev("reversible").set_chunking(0, fused=False)),
        Candidate(f"{rev_name} autograd", lambda: rev("autograd")),
        Candidate(f"timm {vit_name}", lambda: vit(False)),
        Candidate(f"timm {vit_name} + checkpointing", lambda: vit(True)),
    ]


def mvit_candidates(video: bool, img_size: int, num_frames: int) -> list[Candidate]:
    """Rev-MViT-B (reversible and autograd) and its non-reversible twin MViT-B."""
    suffix = "_16x4" if video else ""
    kwargs = dict(img_size=img_size, drop_path_rate=0.0, **(dict(num_frames=num_frames) if video else {}))
    rev, plain = f"rev_mvit_base{suffix}", f"mvit_base{suffix}"
    return [
        Candidate(f"{rev} reversible", lambda: timm.create_model(rev, **kwargs).set_backprop("reversible"),
                  compiles=False),
        Candidate(f"{rev} reversible, recomputed whole",
                  lambda: timm.create_model(rev, **kwargs).set_backprop("reversible").set_chunking(0, fused=False)),
        Candidate(f"{rev} autograd", lambda: timm.create_model(rev, **kwargs).set_backprop("autograd")),
        Candidate(f"{plain}", lambda: timm.create_model(plain, **kwargs)),
    ]


def format_table(results: list[Result]) -> str:
    """Markdown table; ratios relative to the first (reversible) row of the same setting."""
    lines = ["| model | setting | MB per sample | memory vs reversible | step s | step time vs reversible |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ref = next(x for x in results if x.setting == r.setting)
        lines.append(f"| {r.label} | {r.setting} | {r.mb_per_sample:.2f} | {r.mb_per_sample / ref.mb_per_sample:.2f}x "
                     f"| {r.step_seconds:.3f} | {r.step_seconds / ref.step_seconds:.2f}x |")
    return "\n".join(lines)


def run_benchmark(family: str = "vit", size: str = "small", depths: Sequence[int] = (12, 24),
                  batch_size: Optional[int] = None, img_size: Optional[int] = None, num_frames: int = 8,
                  steps: int = 3, device: Optional[str] = None, log: Callable[[str], None] = print,
                  compile: Optional[str] = None) -> list[Result]:
    """Compare the candidates of `family` ("vit": Rev-ViT vs timm's ViT (+checkpointing) at each of `depths`;
    "mvit" / "mvit-video": Rev-MViT-B vs MViT-B, image / 16x4 video) on one random batch; `log` hears the
    progress and what was measured. Defaults: batch 4 / 2 / 1, img_size 224 (112 for video), device cuda
    when available. `compile`: a torch.compile backend ("inductor"): every candidate but the fused ones
    also runs with its blocks compiled (see `compiled`)."""
    if family not in ("vit", "mvit", "mvit-video"):
        raise ValueError(f"family must be vit, mvit or mvit-video, got {family!r}")
    given = dict(batch_size=batch_size, img_size=img_size, num_frames=num_frames, steps=steps)
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1 (or None for the default), got {value!r}")
    if family == "vit" and (not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths)):
        raise ValueError(f"depths must be whole numbers >= 1, e.g. (12, 24), got {list(depths)}")
    device = usable_device(device)
    video = family == "mvit-video"
    batch = batch_size if batch_size is not None else {"vit": 4, "mvit": 2, "mvit-video": 1}[family]
    img_size = img_size if img_size is not None else (112 if video else 224)
    torch.manual_seed(0)
    shape = (batch, 3, num_frames, img_size, img_size) if video else (batch, 3, img_size, img_size)
    x = torch.randn(*shape, device=device)
    results = []
    if family == "vit":
        for depth in depths:
            log(f"measuring depth {depth} ...")
            candidates = vit_candidates(size, depth, img_size)
            results += compare(compiled(candidates, compile) if compile else candidates, x, f"depth {depth}", steps)
    else:
        log(f"measuring {family} ...")
        candidates = mvit_candidates(video, img_size, num_frames)
        results += compare(compiled(candidates, compile) if compile else candidates, x, "x".join(map(str, shape[2:])),
                           steps)
    log(f"\ninput {tuple(shape)}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        "memory = peak activation bytes above parameters+grads")
    return results
