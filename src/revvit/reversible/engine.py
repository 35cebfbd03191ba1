"""Reversible two-stream stacks with a memory-efficient backward.

A block maps two streams (X1, X2) to (Y1, Y2)::

    Y1 = X1 + DropPath(F(X2))
    Y2 = X2 + DropPath(G(Y1))

and is exactly invertible::

    X2 = Y2 - DropPath(G(Y1))
    X1 = Y1 - DropPath(F(X2))

so the backward pass can rebuild every block's input from its output instead of keeping it.

Design (each choice fixes a defect of earlier implementations):

* One autograd Function per block, with that block's parameters as explicit inputs. The Functions save
  no tensors; the stack's last outputs live on a small per-forward :class:`_Tape`, and each block's
  backward leaves its reconstructed inputs there for the block below. So activation memory is one
  stack output plus one block's recomputation, independent of depth; `torch.autograd.grad(loss, params)`
  works; a frozen stem still trains the blocks; and parameter gradients are produced one block at a
  time (a whole-stack Function would hold every block's gradient at once).
* Randomness is replayed, not reseeded: each block records the per-sample drop-path mask it drew and
  the generator state (CPU and, for CUDA inputs, the device's) before F and before G, in the backward
  context of *that* forward call. Global generators are never reseeded, so runs are reproducible from
  `torch.manual_seed`, and two forwards before one backward each replay their own draws.
* The forward's autocast state is re-entered for the recomputation, so AMP recomputes exactly what the
  forward computed.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ReversibleBlock", "ReversibleStack", "BACKPROP_MODES"]

BACKPROP_MODES = ("reversible", "autograd")


@dataclass
class _RNGState:
    """Generator states of the CPU and (optionally) one CUDA device, captured at one instant."""

    cpu: Tensor
    cuda: Optional[Tensor] = None
    device: Optional[torch.device] = None

    @classmethod
    def capture(cls, device: torch.device) -> "_RNGState":
        if device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state())

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this state, leaving the global generators as they were."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class _AutocastState:
    """The autocast settings in force when the forward ran, to be re-entered by the recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> "_AutocastState":
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind),
                   torch.is_autocast_cache_enabled())

    def enter(self):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)


def _scale(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    return x if mask is None else x * mask


class ReversibleBlock(nn.Module):
    """One two-stream block built from any two residual functions F and G.

    F and G map a tensor of shape (B, ...) to the same shape and must not change their input. Drop path
    uses one per-sample mask for both F and G of a block (as the official Rev-ViT does).
    """

    def __init__(self, f: nn.Module, g: nn.Module, drop_path: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.f = f
        self.g = g
        self.drop_path = float(drop_path)

    def sample_mask(self, x: Tensor) -> Optional[Tensor]:
        """Per-sample keep mask scaled by 1/keep, shape (B, 1, ..., 1); None when nothing is dropped."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.sample_mask(x1)
        y1 = x1 + _scale(self.f(x2), mask)
        y2 = x2 + _scale(self.g(y1), mask)
        return y1, y2

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class _Tape:
    """Per-forward hand-off between block backwards: index -> (Y1, Y2) of that block's output."""

    def __init__(self):
        self.outputs: dict[int, tuple[Tensor, Tensor]] = {}

    def take(self, index: int) -> tuple[Tensor, Tensor]:
        try:
            return self.outputs.pop(index)
        except KeyError:
            raise RuntimeError(
                "reversible backward: the output of block %d was not reconstructed. Reversible backprop "
                "needs the gradient to flow through the last block of the stack and each graph to be "
                "backpropagated once (no retain_graph). Use model.set_backprop('autograd') for those "
                "cases." % index) from None


class _ReversibleBlockFunction(torch.autograd.Function):
    """Forward of one block without a graph; backward by reconstruction (see module docstring)."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, block: ReversibleBlock, tape: _Tape, index: int,
                is_last: bool, *params: Tensor) -> tuple[Tensor, Tensor]:
        device = x1.device
        ctx.block, ctx.tape, ctx.index, ctx.params = block, tape, index, params
        ctx.autocast = _AutocastState.capture(device)
        ctx.mask = block.sample_mask(x1)
        random = block.training
        ctx.rng_f = _RNGState.capture(device) if random else None
        y1 = x1 + _scale(block.f(x2), ctx.mask)
        ctx.rng_g = _RNGState.capture(device) if random else None
        y2 = x2 + _scale(block.g(y1), ctx.mask)
        if is_last:
            tape.outputs[index] = (y1.detach(), y2.detach())
        return y1, y2

    @staticmethod
    def backward(ctx, dy1: Tensor, dy2: Tensor):
        block, mask = ctx.block, ctx.mask
        y1, y2 = ctx.tape.take(ctx.index)
        f_params = [p for p in block.f.parameters() if p.requires_grad]
        g_params = [p for p in block.g.parameters() if p.requires_grad]

        # G: recompute G(Y1) with a graph; dY2 flows into Y1 and G's weights. Then X2 = Y2 - G(Y1).
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_(True)
            with _replay(ctx.rng_g), ctx.autocast.enter():
                g_out = _scale(block.g(y1), mask)
            dy1_g, *dg = torch.autograd.grad(g_out, [y1] + g_params, dy2, allow_unused=True)
        with torch.no_grad():
            x2 = y2 - g_out
            dy1 = dy1 + dy1_g
        del g_out, y2

        # F: recompute F(X2) with a graph; dY1 flows into X2 and F's weights. Then X1 = Y1 - F(X2).
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_(True)
            with _replay(ctx.rng_f), ctx.autocast.enter():
                f_out = _scale(block.f(x2), mask)
            dx2_f, *df = torch.autograd.grad(f_out, [x2] + f_params, dy1, allow_unused=True)
        with torch.no_grad():
            x1 = y1.detach() - f_out
            dx2 = dy2 + dx2_f
        del f_out

        if ctx.index > 0:
            ctx.tape.outputs[ctx.index - 1] = (x1, x2.detach())
        grads: dict[int, Tensor] = {}
        for p, grad in zip(f_params + g_params, df + dg):
            if grad is not None:  # a parameter shared by F and G gets the sum of both
                grads[id(p)] = grad if id(p) not in grads else grads[id(p)] + grad
        param_grads = tuple(grads.get(id(p)) for p in ctx.params)
        return (dy1, dx2, None, None, None, None) + param_grads


def _replay(state: Optional[_RNGState]):
    return nullcontext() if state is None else state.replay()


class ReversibleStack(nn.Module):
    """A sequence of :class:`ReversibleBlock` run on two streams.

    `forward(x1, x2) -> (y1, y2)`, every tensor of shape (B, ...). In `"reversible"` mode with autograd
    recording, the activations of the blocks are not kept: peak memory during backward is the stack's
    output plus one block's recomputation, whatever the depth. In `"autograd"` mode (the reference and
    the baseline) the blocks run under ordinary autograd. Without grad recording both modes run the same
    plain forward.
    """

    def __init__(self, blocks: Sequence[ReversibleBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.backprop = "reversible"

    def set_backprop(self, mode: str) -> None:
        if mode not in BACKPROP_MODES:
            raise ValueError(f"backprop mode must be one of {BACKPROP_MODES}, got {mode!r}")
        self.backprop = mode

    def __len__(self) -> int:
        return len(self.blocks)

    def _needs_reversible(self, x1: Tensor, x2: Tensor) -> bool:
        if self.backprop != "reversible" or not torch.is_grad_enabled():
            return False
        return x1.requires_grad or x2.requires_grad or any(p.requires_grad for p in self.parameters())

    def forward(self, x1: Tensor, x2: Tensor, start: int = 0, stop: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Run blocks[start:stop] (all by default) as one reversible segment: of its activations only the
        segment's output is kept. Consecutive segments chain exactly (e.g. to take intermediate features)."""
        blocks = self.blocks[start:stop]
        if not self._needs_reversible(x1, x2):
            for block in blocks:
                x1, x2 = block(x1, x2)
            return x1, x2
        tape = _Tape()
        last = len(blocks) - 1
        for i, block in enumerate(blocks):
            params = [p for p in block.parameters() if p.requires_grad]
            x1, x2 = _ReversibleBlockFunction.apply(x1, x2, block, tape, i, i == last, *params)
        return x1, x2
