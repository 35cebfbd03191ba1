"""Settings applied to every reversible stack or block inside a model."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .engine import ReversibleBlock, ReversibleStack

__all__ = ["set_chunking", "compile_blocks"]


def set_chunking(module: nn.Module, chunk_bytes: Optional[int] = None, fused: bool = True) -> nn.Module:
    """`ReversibleStack.set_chunking` on every reversible stack inside `module`; returns `module`."""
    for m in module.modules():
        if isinstance(m, ReversibleStack):
            m.set_chunking(chunk_bytes, fused)
    return module


def compile_blocks(module: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Regional compilation: `torch.compile` the F and G of every reversible block inside `module` (in
    place, `nn.Module.compile`; also `forward_part`, which a split recomputation calls), and every other
    block of a `blocks` list (e.g. a non-reversible twin's).

    This is the way to compile a reversible model: the engine itself runs eagerly (it is one graph break
    whatever the depth), while each forward, recomputation and backward of F and G runs compiled. Blocks
    of one architecture share their compiled code (parameters are graph inputs), so compile time does
    not grow with depth. Returns `module`; `compile_kwargs` go to `torch.compile` (e.g. `backend`, `mode`).
    """
    compiled: set[int] = set()
    for name, m in module.named_modules():
        if isinstance(m, ReversibleBlock):
            for fn in (m.f, m.g):
                if id(fn) not in compiled:
                    fn.compile(**compile_kwargs)
                    if hasattr(fn, "forward_part"):  # the pieces of a split recomputation (and forward)
                        fn.forward_part = torch.compile(fn.forward_part, **compile_kwargs)
                    compiled.add(id(fn))
        elif isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks":
            for block in m:
                if not isinstance(block, ReversibleBlock) and id(block) not in compiled:
                    block.compile(**compile_kwargs)
                    compiled.add(id(block))
    return module
