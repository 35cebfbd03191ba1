"""Exact activation-memory measurement of one training step.

What is measured: the peak number of bytes held by tensors allocated *during* the step (forward, loss,
backward), above the steady state in which parameters and their gradients already exist. That is the
memory that grows with batch size and depth, and the quantity the paper reports per image.

* CUDA: `torch.cuda.max_memory_allocated` minus the allocation before the step.
* CPU: a `TorchDispatchMode` sees every operator's outputs; an output whose storage is not one of the
  operator's inputs is a fresh allocation and is counted until its storage is freed (storages keep their
  Python object alive while any tensor uses them, so a weakref finalizer fires exactly at the free). The
  CPU allocator's caching and fragmentation are not counted: the figure is what the tensors need.
"""
from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MemoryReport", "StorageMeter", "measure_training_memory", "track_peak_memory", "training_step",
           "memory_table"]

MB = 1024 ** 2


class StorageMeter(TorchDispatchMode):
    """Counts bytes of storages created inside the mode, live and peak. CPU or any device."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[int] = set()

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor) and t.layout == torch.strided}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._tracked or storage.nbytes() == 0:
                continue  # a view or in-place result, or already counted
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


@contextmanager
def track_peak_memory(device: torch.device) -> Iterator[dict]:
    """Context yielding a dict whose "peak_bytes" is set on exit: bytes allocated above the entry level."""
    result = {"peak_bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        meter = StorageMeter()
        with meter:
            yield result
        result["peak_bytes"] = meter.peak_bytes


@dataclass
class MemoryReport:
    peak_bytes: int  # peak activation bytes of one training step above the steady state
    batch_size: int
    device: str

    @property
    def bytes_per_sample(self) -> float:
        return self.peak_bytes / self.batch_size

    @property
    def mb_per_sample(self) -> float:
        return self.bytes_per_sample / MB


def _default_loss(output: Tensor, targets: Optional[Tensor]) -> Tensor:
    if targets is None:
        return output.float().square().mean()
    return F.cross_entropy(output.float(), targets)


def training_step(model: nn.Module, inputs: Tensor, targets: Optional[Tensor] = None,
                  loss_fn: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None,
                  autocast_dtype: Optional[torch.dtype] = None) -> None:
    """One forward (under autocast when `autocast_dtype` is given) and backward: what is measured and timed."""
    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = model(inputs)
    (loss_fn or _default_loss)(output, targets).backward()


def measure_training_memory(model: nn.Module, inputs: Tensor, targets: Optional[Tensor] = None,
                            loss_fn: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None,
                            autocast_dtype: Optional[torch.dtype] = None) -> MemoryReport:
    """Peak activation memory of one forward+backward of `model` on `inputs` (B, ...).

    Steady state first: one unmeasured step allocates every parameter's `.grad`; the grads are then
    zeroed in place, so the measured step's gradient accumulation allocates nothing new. The model is
    left in train mode with zeroed gradients; its weights are not changed.
    """
    model.train()
    step_args = (model, inputs, targets, loss_fn, autocast_dtype)
    training_step(*step_args)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    with track_peak_memory(inputs.device) as result:
        training_step(*step_args)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    return MemoryReport(result["peak_bytes"], inputs.shape[0], str(inputs.device))


def memory_table(model: nn.Module, dataset, device: torch.device, say: Callable[[str], None] = print,
                 batch: int = 8) -> dict:
    """Peak activation bytes per image of one training step on the first `batch` samples of `dataset`,
    reversible vs autograd backprop, measured on a copy of `model`; says the table and returns the figures
    ({} for a model without reversible backprop)."""
    if not hasattr(model, "set_backprop"):
        return {}
    x = torch.stack([dataset[i][0] for i in range(batch)]).to(device)
    y = torch.tensor([dataset[i][1] for i in range(batch)], device=device)
    probe = copy.deepcopy(model)
    result = {}
    for mode in ("reversible", "autograd"):
        probe.set_backprop(mode)
        result[mode] = measure_training_memory(probe, x, y).bytes_per_sample
    probe.set_backprop(model.backprop)
    ratio = result["autograd"] / max(result["reversible"], 1)
    shape = "x".join(str(s) for s in x.shape[1:])
    say(f"\npeak activation memory per image (one training step, batch {batch}, input {shape}, {device.type}):\n"
        f"  {'backprop':<12}{'KB/image':>12}\n"
        f"  {'reversible':<12}{result['reversible'] / 1024:>12.1f}\n"
        f"  {'autograd':<12}{result['autograd'] / 1024:>12.1f}\n"
        f"  reversible needs {ratio:.1f}x less activation memory")
    return {"batch": batch, "bytes_per_image": result, "ratio": ratio}
