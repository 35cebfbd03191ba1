"""Unreadable files, handled twice: an up-front check drops what fails to open (and names it), and
`__getitem__` catches what only fails at decode time, substituting the next sample so training goes on.

Why both: a header check of every file is cheap enough to run before training and gives one final list
(`DataBundle.skipped`), but it cannot see a JPEG/mp4 truncated mid-stream; those surface only when
decoded, inside DataLoader workers, where raising would kill the epoch.

The up-front check costs one open per file: seconds for a small dataset, but hours for ImageNet or
Kinetics. So by default (`verify=None`) a split is checked up front only when it has at most
`VERIFY_MAX_FILES` files; a larger one relies on the load-time substitution alone.
"""
from __future__ import annotations

import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

__all__ = ["SkippingDataset", "VERIFY_MAX_FILES", "should_verify", "find_unreadable", "warn_skipped", "TransformError",
           "run_transform", "EpochSeeded", "KeyedSampler", "SkippedFiles"]

Sample = tuple[str, int]

VERIFY_MAX_FILES = 20_000  # verify=None: check a split up front only up to this many files


class TransformError(RuntimeError):
    """A transform failed on a file that was read: a bug or bad setting of the augmentation, not of the data.
    Raised (not substituted): the message names the transform and the file."""


def run_transform(transform: Callable, x, path: str):
    """`transform(x)`, step by step for a Compose, so that a failure names the step (TransformError)."""
    for step in getattr(transform, "transforms", [transform]):
        try:
            x = step(x)
        except Exception as e:
            raise TransformError(f"the transform {step!r:.300} failed on {path}, which was read correctly "
                                 f"({type(e).__name__}: {e}); change the augmentation setting (auto_augment, "
                                 "train_aug), this is not a data error") from e
    return x


def should_verify(verify: Optional[bool], num_files: int) -> bool:
    """The verification policy: True/False as given; None (auto) = the split is small enough."""
    return num_files <= VERIFY_MAX_FILES if verify is None else verify


def find_unreadable(paths: Sequence[str], check: Callable[[str], None], workers: int = 8) -> list[str]:
    """The paths for which `check(path)` raises, in input order. Threads: the checks are I/O-bound."""
    def bad(path: str) -> bool:
        try:
            check(path)
            return False
        except Exception:
            return True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        flags = list(pool.map(bad, paths))
    return [p for p, f in zip(paths, flags) if f]


class SkippedFiles(UserWarning):
    """The warning naming the files dropped before training (a caller that reports them itself filters it)."""


def warn_skipped(bad: Sequence[str], where: str, show: int = 10) -> None:
    """One warning naming the skipped files (the first `show` of them) and how many there are."""
    if bad:
        names = ", ".join(bad[:show]) + (f", ... ({len(bad) - show} more)" if len(bad) > show else "")
        # stacklevel 4: warn_skipped <- _image_folders/_video_lists <- build_datasets <- its caller
        warnings.warn(f"skipped {len(bad)} unreadable file(s) in {where}: {names}", SkippedFiles, stacklevel=4)


class SkippingDataset(Dataset):
    """(path, label) samples; `load(path)` -> tensor. A sample that fails to load is recorded in
    `self.failed` (per process: with DataLoader workers each worker keeps its own list, and the
    warning is the cross-process record) and replaced by the next one, up to `max_tries` in a row."""

    max_tries = 10
    record: Optional[str] = None  # a file each process appends the unreadable paths to (summary.json counts them)

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)
        self.failed: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int):
        for k in range(min(self.max_tries, len(self.samples))):
            i = (index + k) % len(self.samples)
            path, label = self.samples[i]
            try:
                return self.load(path), label
            except TransformError:
                raise
            except Exception as e:  # any decoder error: record and substitute, never crash the epoch
                if path not in self.failed:
                    self.failed.append(path)
                    warnings.warn(f"skipping unreadable file {path}: {type(e).__name__}: {e}", stacklevel=1)
                    if self.record:
                        with open(self.record, "a") as f:  # appends of one short line do not interleave
                            f.write(path + "\n")
        raise RuntimeError(f"{self.max_tries} consecutive samples from index {index} failed to load; "
                           f"first failures: {self.failed[:3]}. Check the dataset files.")


# -- augmentation as a function of (seed, epoch, sample position) ----------------------------------------
class EpochSeeded(Dataset):
    """Wraps a training dataset so that each sample's random draws (torch, numpy, python `random`: what
    timm/torchvision transforms and the video transforms use) are seeded from (seed, epoch, key), not taken
    from the state of whichever process loads it. So augmentation is the same with 0, 2 or 8 DataLoader
    workers, and a run resumed mid-epoch augments the remaining samples exactly as an uninterrupted one.

    `dataset[i]` uses key i; `dataset[(i, key)]` (from `KeyedSampler`) uses `key`, the sample's position in
    the epoch, so a sample drawn twice in an epoch (repeated augmentation) gets two augmentations. The caller's
    generators are left as they were. Other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        index, key = item if isinstance(item, tuple) else (item, item)
        words = np.random.SeedSequence([v % 2**32 for v in (self.seed, self.epoch, key)]).generate_state(2)
        seed = int(words[0]) << 32 | int(words[1])
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class KeyedSampler(Sampler):
    """Yields (index, key) for `EpochSeeded`: key = the index's position in the epoch over all processes
    (rank r of W takes positions r, r + W, ... as DistributedSampler and RepeatAugSampler deal them),
    counted from `first`, the position of the first index yielded (a resumed epoch skips some)."""

    def __init__(self, sampler: Sampler, first: int = 0, rank: int = 0, world_size: int = 1):
        self.sampler, self.first, self.rank, self.world_size = sampler, first, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, index in enumerate(self.sampler, self.first):
            yield int(index), k * self.world_size + self.rank

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]
