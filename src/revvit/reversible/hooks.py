"""Whether a module's call would run hooks (its own, global ones, FSDP2's): a path that bypasses the call (the
engine's couplings, a fused layer) must then call it."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["has_hooks", "sharded"]


def has_hooks(module: nn.Module) -> bool:
    """Hooks that calling `module` would run: its own, or global ones (e.g. a module tracker's)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def sharded(block: nn.Module) -> bool:
    """Whether `block` is sharded by FSDP2 (`fully_shard`): it must be called, not bypassed, in the forward,
    and its parameters gathered (`unshard`, a no-op when they are) before a recomputation."""
    fsdp = getattr(torch.distributed, "fsdp", None) if torch.distributed.is_available() else None
    return fsdp is not None and isinstance(block, getattr(fsdp, "FSDPModule", ()))
