"""Whether a module's call would run hooks: a fused path that bypasses the call must then step aside."""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def has_hooks(module: nn.Module) -> bool:
    """Hooks that calling `module` would run: its own, or global ones (e.g. a module tracker's)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)
