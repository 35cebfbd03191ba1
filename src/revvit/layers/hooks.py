"""Whether a module's call would run hooks: a fused path that bypasses the call must then step aside."""
from ..reversible.hooks import has_hooks

__all__ = ["has_hooks"]
