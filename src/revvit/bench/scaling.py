"""The paper's scaling tables: the largest batch that fits a memory budget and the throughput at that batch,
per backprop method, and both against depth.

    methods = vit_methods("small", depth=12, img_size=224)          # autograd, checkpointing, reversible, parallel
    rows = budget_table(methods, (3, 224, 224), budget=16 * 2**30, device=torch.device("cuda"))
    sweep = depth_sweep(lambda d: vit_methods("small", d, 224), (12, 24, 48, 96), (3, 224, 224), budget, device)
    plot_depth_sweep(sweep, "scaling.png")

Memory here is the whole training step, as a GPU budget has to hold it: parameters, gradients, AdamW
state, the input and every activation, *measured* by running two AdamW steps at that batch (the second
one has the optimiser state in place): `torch.cuda.max_memory_allocated` on CUDA (an out-of-memory error
counts as not fitting), the storage meter on CPU plus the parameters (so the search runs and is tested
anywhere). Throughput is images per second over timed steps after warm-up, CUDA events on a GPU, the
methods interleaved round-robin so that drift hits them alike.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .memory import StorageMeter

__all__ = ["Method", "BudgetRow", "step_peak_bytes", "max_batch", "budget_table", "depth_sweep", "budget_sweep",
           "vit_methods", "mvit_methods", "format_budget_table", "plot_depth_sweep", "parse_bytes"]


@dataclass
class Method:
    label: str  # "autograd", "checkpointing", "reversible", "parallel"
    build: Callable[[], nn.Module]  # built when measured, one at a time


@dataclass
class BudgetRow:
    label: str
    depth: int
    max_batch: int  # 0: not even one sample fits
    peak_bytes: int  # of a full training step at max_batch
    images_per_s: float  # at max_batch (0.0 when nothing fits)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_bytes(text: str) -> int:
    """'16GB', '16GiB', '512MB', '1e9' -> bytes (GB and GiB both mean 2**30, as GPU sizes are quoted)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if s and s[-1] in units:
            value = float(s[:-1]) * units[s[-1]]
        else:
            value = float(s)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size: write e.g. 16GB, 512MB or 1e9") from None
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return int(value)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x).float(), torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).backward()
    optimizer.step()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_peak_bytes(model: nn.Module, batch: int, sample_shape: Sequence[int], device: torch.device) -> int | None:
    """Peak bytes of two AdamW training steps of `model` at `batch`, everything alive included; None on OOM."""
    model.train()
    model.zero_grad(set_to_none=True)
    _release(device)
    x = optimizer = None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randn(batch, *sample_shape, device=device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            for _ in range(2):
                _step(model, optimizer, x)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        with StorageMeter() as meter:
            x = torch.randn(batch, *sample_shape, device=device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            for _ in range(2):
                _step(model, optimizer, x)
            x = optimizer = None
            model.zero_grad(set_to_none=True)
        return params + meter.peak_bytes
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        x = optimizer = None
        model.zero_grad(set_to_none=True)
        _release(device)


def max_batch(model: nn.Module, sample_shape: Sequence[int], budget: int, device: torch.device,
              limit: int = 1 << 16) -> tuple[int, int]:
    """(largest batch whose training step fits `budget` bytes, its peak bytes): doubling, then bisection.
    Every probe is a measured step. (0, peak at batch 1) when not even one sample fits."""
    def fits(b: int) -> tuple[bool, int]:
        peak = step_peak_bytes(model, b, sample_shape, device)
        return peak is not None and peak <= budget, peak or 0

    ok, peak = fits(1)
    if not ok:
        return 0, peak
    lo, lo_peak = 1, peak
    ok, peak2 = fits(2)
    if not ok:
        return lo, lo_peak
    lo, lo_peak = 2, peak2
    # memory is close to linear in the batch: start from the extrapolated answer, then bracket it
    per_sample = max(peak2 - peak, 1)
    guess = max(3, min(limit, int(2 + (budget - peak2) / per_sample)))
    ok, peak = fits(guess)
    if ok:
        lo, lo_peak, hi = guess, peak, guess + max(1, guess // 8)
        while hi <= limit:
            ok, peak = fits(hi)
            if not ok:
                break
            lo, lo_peak, hi = hi, peak, hi + max(1, hi // 4)
    else:
        hi = guess
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        ok, peak = fits(mid)
        lo, lo_peak, hi = (mid, peak, hi) if ok else (lo, lo_peak, mid)
    return lo, lo_peak


def _timed_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(model, optimizer, x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    _step(model, optimizer, x)
    return time.perf_counter() - t0


def budget_table(methods: Sequence[Method], sample_shape: Sequence[int], budget: int, device: torch.device,
                 depth: int = 0, steps: int = 5, warmup: int = 2,
                 log: Callable[[str], None] = lambda msg: None) -> list[BudgetRow]:
    """Per method: the largest batch within `budget` and its images/s (median of `steps` timed steps,
    after `warmup`, methods interleaved). `log` is told each method's batch as it is found."""
    found = []
    for m in methods:
        t0 = time.perf_counter()
        model = m.build().to(device)
        batch, peak = max_batch(model, sample_shape, budget, device)
        found.append((m, batch, peak))
        log(f"  {m.label}: batch {batch} ({peak / 2**20:.1f} MiB at its peak; {time.perf_counter() - t0:.0f} s)")
        del model
        _release(device)
    log(f"  timing {warmup} + {steps} steps of each at its batch ...")
    try:
        times = _time_methods(found, sample_shape, device, steps, warmup, together=True)
    except torch.cuda.OutOfMemoryError:  # each batch was sized to run alone: time them one at a time
        _release(device)
        times = _time_methods(found, sample_shape, device, steps, warmup, together=False)
    rows = []
    for m, batch, peak in found:
        rate = batch / statistics.median(times[m.label]) if batch else 0.0
        rows.append(BudgetRow(m.label, depth, batch, peak, rate))
    return rows


def _time_methods(found, sample_shape, device, steps: int, warmup: int, together: bool) -> dict[str, list[float]]:
    """Seconds per step of each method at its batch: interleaved round-robin when all fit at once
    (`together`, drift hits them alike), else one method after another."""
    groups = [[f for f in found if f[1]]] if together else [[f] for f in found if f[1]]
    times: dict[str, list[float]] = {}
    for group in groups:
        runs = {}
        for m, batch, _ in group:
            model = m.build().to(device).train()
            runs[m.label] = (model, torch.optim.AdamW(model.parameters(), lr=1e-6),
                             torch.randn(batch, *sample_shape, device=device))
            times[m.label] = []
        for i in range(warmup + steps):
            for label, (model, optimizer, x) in runs.items():
                seconds = _timed_steps(model, optimizer, x)
                if i >= warmup:
                    times[label].append(seconds)
        runs.clear()
        _release(device)
    return times


def depth_sweep(methods_at: Callable[[int], Sequence[Method]], depths: Sequence[int], sample_shape: Sequence[int],
                budget: int, device: torch.device, steps: int = 5) -> list[BudgetRow]:
    """`budget_table` at each depth: where the memory-saving methods' larger batches overtake autograd."""
    rows = []
    for depth in depths:
        rows += budget_table(methods_at(depth), sample_shape, budget, device, depth=depth, steps=steps)
    return rows


def budget_sweep(family: str, size: str, depths: Sequence[int], img_size: int, budget: int, device: torch.device,
                 steps: int = 5, log: Callable[[str], None] = print) -> list[BudgetRow]:
    """`revvit bench --budget`: the depth sweep of `family` ("vit" at `size`, or "mvit") at `img_size`."""
    rows = []
    for depth in depths:
        log(f"depth {depth}: searching the largest batch of each method within {budget / 2**20:,.0f} MiB "
            "(every probe is a measured training step) ...")
        methods = vit_methods(size, depth, img_size) if family == "vit" else mvit_methods(depth, img_size)
        rows += budget_table(methods, (3, img_size, img_size), budget, device, depth=depth, steps=steps, log=log)
    return rows


def format_budget_table(rows: Sequence[BudgetRow], budget: int, device: torch.device) -> str:
    """Markdown: per depth and method, the largest batch, its peak memory and images/s, vs autograd."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    unit, scale = ("GiB", 2**30) if budget >= 2**30 else ("MiB", 2**20)
    lines = [f"budget {budget / 2**30:.2f} GiB on {name}, torch {torch.__version__}",
             f"| depth | method | max batch | batch vs autograd | peak {unit} | images/s | images/s vs autograd |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next((x for x in rows if x.depth == r.depth and x.label == "autograd"), r)
        batch_ratio = f"{r.max_batch / ref.max_batch:.2f}x" if ref.max_batch else "-"
        rate_ratio = f"{r.images_per_s / ref.images_per_s:.2f}x" if ref.images_per_s else "-"
        lines.append(f"| {r.depth} | {r.label} | {r.max_batch} | {batch_ratio} | {r.peak_bytes / scale:.2f} "
                     f"| {r.images_per_s:.1f} | {rate_ratio} |")
    return "\n".join(lines)


# -- the compared methods per family ------------------------------------------------------------------

def vit_methods(size: str, depth: int, img_size: int) -> list[Method]:
    """timm's ViT with autograd and with activation checkpointing; Rev-ViT reversible and parallel."""
    kwargs = dict(depth=depth, img_size=img_size, drop_path_rate=0.0)

    def vit(checkpointing: bool) -> nn.Module:
        model = timm.create_model(f"vit_{size}_patch16_224", **kwargs)
        model.set_grad_checkpointing(checkpointing)
        return model

    def rev(mode: str) -> nn.Module:
        return timm.create_model(f"rev_vit_{size}_patch16_224", **kwargs).set_backprop(mode)

    return [Method("autograd", lambda: vit(False)), Method("checkpointing", lambda: vit(True)),
            Method("reversible", lambda: rev("reversible")), Method("parallel", lambda: rev("parallel"))]


def mvit_methods(depth: int, img_size: int) -> list[Method]:
    """The MViT-B twin with autograd; Rev-MViT-B reversible and parallel. `depth` layers as stages of
    (1, 2, depth - 5, 2), MViT-B's layout (16 layers: 1, 2, 11, 2)."""
    if depth < 6:
        raise ValueError(f"an MViT-B layout needs at least 6 layers, got {depth}")
    kwargs = dict(img_size=img_size, drop_path_rate=0.0, stage_depths=(1, 2, depth - 5, 2))

    def build(name: str, mode: str | None = None) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            model = timm.create_model(name, **kwargs)
            return model.set_backprop(mode) if mode else model
        return make

    return [Method("autograd", build("mvit_base")), Method("reversible", build("rev_mvit_base", "reversible")),
            Method("parallel", build("rev_mvit_base", "parallel"))]


def plot_depth_sweep(rows: Sequence[BudgetRow], path: str, title: str = "") -> None:
    """Two panels against depth: the largest batch within the budget, and images/s at that batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r.label for r in rows):
        mine = sorted((r for r in rows if r.label == label), key=lambda r: r.depth)
        depths = [r.depth for r in mine]
        left.plot(depths, [r.max_batch for r in mine], marker="o", label=label)
        right.plot(depths, [r.images_per_s for r in mine], marker="o", label=label)
    left.set(xlabel="depth (layers)", ylabel="largest batch in budget", yscale="log")
    right.set(xlabel="depth (layers)", ylabel="images / s at that batch")
    left.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
