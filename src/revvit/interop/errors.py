"""The one error type of revvit's weight files: which file, what is wrong with it, and what to do.

It lives in `revvit.io` (which imports nothing of revvit) so that training raises the same type; this
module keeps the name `revvit.interop.errors.CheckpointError` for the interop code and its users.
"""
from ..io import CheckpointError

__all__ = ["CheckpointError"]
