"""The one error type of `revvit.interop`: which file, what is wrong with it, and what to do."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["CheckpointError"]


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
