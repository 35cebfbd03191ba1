"""Files that are whole or absent: `atomic_write`, and `CheckpointError` for a weights or checkpoint file
that cannot be read, understood or written. Imports nothing of revvit: training, interop and the CLI all
build on it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional

__all__ = ["CheckpointError", "atomic_write"]


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
        super().__init__(f"{where}{problem}" + (f"\n{hint}" if hint else ""))


def atomic_write(path: os.PathLike | str, write: Callable[[Any], None]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, make it durable (fsync of file and
    folder), then rename it over `path`: a crash at any moment leaves the old file or the new one, never a
    truncated one, and a failed write removes its temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(str(path), f"the folder {folder!r} does not exist", "Create it first.")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (some platforms): the rename is done, only not fsynced
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
