"""Hooks and the engine. Whether a call records a graph at all (`records_graph`). Whether a module's call
would run hooks (its own, global ones, FSDP2's): a path that bypasses the call (the engine's couplings, a
fused layer) must then call it (`has_hooks`, `sharded`, `called`, which refuses a hook that changes a
block's streams). And whether F or G is being recomputed now (`recomputing`), for hooks inside them that
should see each forward once."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

__all__ = ["has_hooks", "sharded", "called", "recomputing", "recomputation", "records_graph"]


def has_hooks(module: nn.Module) -> bool:
    """Hooks that calling `module` would run: its own, or global ones (e.g. a module tracker's)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def records_graph(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether calling `module` on `inputs` now would build an autograd graph worth saving memory on (not
    under torch.func's transforms, grad or vmap: they differentiate the plain forward themselves)."""
    return torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active() and (
        any(x.requires_grad for x in inputs) or any(p.requires_grad for p in module.parameters()))


def sharded(block: nn.Module) -> bool:
    """Whether `block` is sharded by FSDP2 (`fully_shard`): it must be called, not bypassed, in the forward,
    and its parameters gathered (`unshard`, a no-op when they are) before a recomputation."""
    fsdp = getattr(torch.distributed, "fsdp", None) if torch.distributed.is_available() else None
    return fsdp is not None and isinstance(block, getattr(fsdp, "FSDPModule", ()))


def called(block: nn.Module, run, x1: Tensor, x2: Tensor, strict: bool) -> tuple[Tensor, Tensor]:
    """`block(x1, x2, run=run)`: the block is called so that its hooks run, `run` does its work. The engine
    rebuilds each block's input from its output, so with `strict` a hook that replaced or changed the
    streams (a pre-hook returning new inputs, a hook returning or editing the outputs) is refused. FSDP2's
    hooks are not strict: they cast inputs to the parameters' precision."""
    seen: list[tuple[Tensor, int]] = []  # the streams as `run` was given and made them, and their versions

    def checked(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        seen.extend([(a, a._version), (b, b._version)])
        y1, y2 = run(a, b)
        seen.extend([(y1, y1._version), (y2, y2._version)])
        return y1, y2

    out = block(x1, x2, run=checked if strict else run)
    if strict:
        handed = [x1, x2, *out] if isinstance(out, tuple) and len(out) == 2 else []  # given, and given back
        if len(handed) != len(seen) or not all(_same(h, t) and t._version == v for h, (t, v) in zip(handed, seen)):
            raise RuntimeError(f"a hook on reversible block {type(block).__name__} replaced or changed its input or "
                               "output streams: the engine rebuilds each block's input from its output, so hooks may "
                               "read the streams but not change them; use set_backprop('autograd') for such hooks")
    return out


def _same(t: Tensor, u: Tensor) -> bool:
    """The same values in the same memory (a hook may hand on an alias, as full backward hooks do)."""
    return t.data_ptr() == u.data_ptr() and t.shape == u.shape and t.stride() == u.stride() and t.dtype == u.dtype


_STATE = threading.local()


def recomputing() -> bool:
    """Whether the reversible engine is recomputing an F or G right now. Hooks inside F and G run again when
    they are recomputed (as under activation checkpointing); one that collects features or statistics once
    per forward can skip these calls: `if revvit.reversible.recomputing(): return`."""
    return getattr(_STATE, "depth", 0) > 0


@contextmanager
def recomputation() -> Iterator[None]:
    """Marks the body as a recomputation (see `recomputing`)."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1
