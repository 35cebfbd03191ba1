"""Files that are whole or absent: `atomic_write`, and `CheckpointError` for a weights or checkpoint file
that cannot be read, understood or written. Imports nothing of revvit: training, interop and the CLI all
build on it.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["CheckpointError", "atomic_write", "disk_full", "remove_stale_temps", "plain_data", "TEMP_SUFFIX",
           "saved_by_torch", "FolderBefore", "folder_before", "remove_created"]

TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files: ".<final name>.<random>.tmp" beside the final file


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read, understood or mapped completely.

    `path` is the file; `problem` says what is wrong; `hint` says what to do. Nothing was written or
    changed when this is raised.
    """

    def __init__(self, path: Optional[os.PathLike | str], problem: str, hint: str = ""):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.hint = hint
        where = f"{self.path!r}: " if self.path is not None else ""
        joint = "\n" if problem.rstrip().endswith((".", ":", ";", "!", "?")) else ".\n"
        super().__init__(f"{where}{problem}" + (f"{joint}{hint}" if hint else ""))


def disk_full(path: os.PathLike | str) -> CheckpointError:
    """The error for a write that ran out of space (ENOSPC), with the free space left where `path` goes."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free)"
    except OSError:
        free = ""
    return CheckpointError(path, f"disk full{free}: nothing was replaced (the previous file, if any, is intact)",
                           f"Free space on the disk holding {folder}, then run again (revvit train: with --resume).")


class _Recording:
    """A file that remembers the OSError its write raised: torch.save's zip writer swallows it and reports
    "unexpected pos ..." instead, which would hide a full disk."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write(path: os.PathLike | str, write: Callable[[Any], None]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, make it durable (fsync of file and
    folder), then rename it over `path`: a crash at any moment leaves the old file or the new one, never a
    truncated one, and a failed write removes its temporary file. A full disk (ENOSPC, also when the writer
    reports it as something else) raises `disk_full(path)`."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(str(path), f"the folder {folder!r} does not exist", "Create it first.")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file, readable as usual
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = f.error if f is not None and f.error is not None else e
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise disk_full(path) from e
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (some platforms): the rename is done, only not fsynced
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(folder: os.PathLike | str) -> list[str]:
    """Delete the temporary files a killed `atomic_write` left in `folder` (".<name>.<random>.tmp"); their
    names. Call it only where no other process is writing into `folder`."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.scandir(folder):
        if entry.is_file() and entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) \
                and entry.name.count(".") >= 3:
            os.unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def saved_by_torch(path: os.PathLike | str) -> bool:
    """Whether `path` starts as `torch.save`'s files do (a zip archive, or a pickle in the legacy format),
    e.g. to tell a damaged checkpoint from a file of another kind."""
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError:
        return False
    return first == b"\x80" or zipfile.is_zipfile(path)


class FolderBefore(NamedTuple):
    """What a run's output folder was before the run wrote to it (`folder_before`)."""

    created: Optional[str]  # the outermost folder on its path the run will create; None: the folder exists
    entries: frozenset  # the names it held (empty when it is to be created)


def folder_before(folder: os.PathLike | str) -> FolderBefore:
    """Take `folder`'s state before a run writes to it, for `remove_created`."""
    top = os.path.abspath(folder)
    if os.path.isdir(top):
        return FolderBefore(None, frozenset(os.listdir(top)))
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    return FolderBefore(top, frozenset())


def remove_created(folder: os.PathLike | str, before: FolderBefore) -> list[str]:
    """Remove what was created in and above `folder` since `before` (the folders made, or the entries added to
    a folder that existed), keeping what was there; the names of `folder`'s entries removed."""
    folder = os.fspath(folder)
    added = sorted(set(os.listdir(folder)) - before.entries) if os.path.isdir(folder) else []
    if before.created is not None:
        shutil.rmtree(before.created, ignore_errors=True)
        return added
    for name in added:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return added


def plain_data(value: Any) -> Any:
    """Tuples and lists as lists, mappings as dicts with string keys, recursively: what JSON and YAML's safe
    dumper write."""
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    return value
