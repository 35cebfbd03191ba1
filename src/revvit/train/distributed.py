"""Process-group setup from torchrun's environment, samplers, and cross-rank sums.

One process per device. `torchrun --nproc_per_node N` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; without
them the run is a single process and every helper here degrades to a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistInfo", "init_distributed", "shutdown", "all_reduce_sum", "ShardSampler", "SkipSampler"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Pick the device and, under torchrun, join the process group (nccl on GPUs, gloo on CPUs)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda, but this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                         "False): use device=cpu or device=auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r+W, r+2W, ... — every sample exactly once over all ranks,
    no padding (ranks may differ by one; only summed counts cross ranks, so that is harmless)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """Wraps an epoch's sampler and drops its first `skip` indices: resuming mid-epoch restarts the same
    permutation at the first unconsumed batch (skip = consumed batches x batch size)."""

    def __init__(self, sampler: Sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]
