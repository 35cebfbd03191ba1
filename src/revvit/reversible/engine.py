"""Reversible two-stream stacks with a memory-efficient backward.

A block maps two streams (X1, X2) to (Y1, Y2)::

    Y1 = X1 + DropPath(F(X2))
    Y2 = X2 + DropPath(G(Y1))

and is exactly invertible::

    X2 = Y2 - DropPath(G(Y1))
    X1 = Y1 - DropPath(F(X2))

so the backward pass can rebuild every block's input from its output instead of keeping it.

Design (each choice fixes a defect of earlier implementations):

* A stack is a sequence of additive couplings, two per block: `streams[t] += DropPath(fn(streams[1-t]))`
  with (fn, t) = (F, 0) then (G, 1). Each coupling is one autograd Function whose inputs include fn's
  parameters, and which saves no tensor: a per-forward :class:`_Tape` holds the stack's input and the two
  streams as they stand after the couplings not yet walked back (at first, the stack's output), and each
  coupling's backward rebuilds its input there for the coupling below. So activation memory is the stack's
  input and output plus one F or G recomputation, whatever the depth; `torch.autograd.grad(loss, params)` works; a frozen stem
  still trains the blocks; and parameter gradients leave one F or G at a time.
* Randomness is replayed, not reseeded: the forward records each block's per-sample drop-path mask and
  the generator states (CPU and, for CUDA inputs, the device's) before each F and G, on the tape of
  *that* forward call. Global generators are never reseeded, so runs are reproducible from
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

__all__ = ["ReversibleBlock", "ReversibleStack", "BACKPROP_MODES", "records_graph"]

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


def records_graph(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether calling `module` on `inputs` now would build an autograd graph worth saving memory on."""
    return torch.is_grad_enabled() and (any(x.requires_grad for x in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


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


@dataclass
class _Coupling:
    """One additive coupling as the forward ran it: streams[target] += mask * fn(streams[1 - target])."""

    fn: nn.Module
    target: int
    mask: Optional[Tensor]
    rng: Optional[_RNGState]
    autocast: _AutocastState

    def recompute(self, b: Tensor) -> Tensor:
        """mask * fn(b) with the forward's random draws and autocast state."""
        with (self.rng.replay() if self.rng is not None else nullcontext()), self.autocast.enter():
            return _scale(self.fn(b), self.mask)


class _Tape:
    """What one forward of a stack leaves for its backward: its input, its couplings in order, and the two
    streams as they stand after coupling `top` (the last one not yet walked back).

    The input is kept (one tensor when both streams start from the same one, as in every revvit model) so
    the first block runs on its exact input rather than a reconstruction: at a stack's base a rounding
    error would otherwise meet inputs that can be exactly zero (a sample whose stage transition was
    dropped) and a LayerNorm there amplifies it by 1/sqrt(eps).
    """

    def __init__(self, x1: Tensor, x2: Tensor):
        self.inputs = [x1.detach(), x2.detach()]
        self.couplings: list[_Coupling] = []
        self.streams: list[Tensor] = []
        self.top = -1

    def streams_after(self, index: int) -> list[Tensor]:
        """The streams right after coupling `index`. Couplings above it whose backward does not run (their
        output reached no loss: always a suffix of the stack) are first inverted without a graph."""
        if index > self.top:
            raise RuntimeError(
                "reversible backward: this stack's activations were already rebuilt and released by an earlier "
                "backward through the same graph. Reversible backprop walks each forward back once (no "
                "retain_graph); use model.set_backprop('autograd') to backpropagate twice.")
        with torch.no_grad():
            while self.top > index:
                c = self.couplings[self.top]
                self.streams[c.target] = self.streams[c.target] - c.recompute(self.streams[1 - c.target])
                self.top -= 1
        return self.streams


class _CouplingFunction(torch.autograd.Function):
    """out = a + mask * fn(b) without a graph; backward by recomputing fn(b) and rebuilding a = out - ..."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, tape: _Tape, index: int, *params: Tensor) -> Tensor:
        ctx.tape, ctx.index, ctx.params = tape, index, params
        c = tape.couplings[index]
        return a + _scale(c.fn(b), c.mask)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        tape, index = ctx.tape, ctx.index
        c = tape.couplings[index]
        streams = tape.streams_after(index)
        out, b = streams[c.target], streams[1 - c.target]
        # recompute fn(b) with a graph: d_out flows into b and fn's weights (and unchanged into a) ...
        with torch.enable_grad():
            b = b.detach().requires_grad_(True)
            f = c.recompute(b)
            d_b, *d_params = torch.autograd.grad(f, [b, *ctx.params], d_out, allow_unused=True)
        # ... then rebuild this coupling's input: a = out - fn(b); the first coupling of each stream has it kept
        with torch.no_grad():
            streams[c.target] = tape.inputs[c.target] if index == c.target else out - f
        streams[1 - c.target] = b.detach()
        tape.top = index - 1
        return (d_out, d_b, None, None, *d_params)


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


    def forward(self, x1: Tensor, x2: Tensor, start: int = 0, stop: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Run blocks[start:stop] (all by default) as one reversible segment: of its activations only the
        segment's output is kept. Consecutive segments chain exactly (e.g. to take intermediate features)."""
        blocks = self.blocks[start:stop]
        if self.backprop != "reversible" or not records_graph(self, x1, x2):
            for block in blocks:
                x1, x2 = block(x1, x2)
            return x1, x2
        tape = _Tape(x1, x2)
        for block in blocks:
            mask = block.sample_mask(x1)  # one per-sample mask for F and G, drawn first as in block.forward
            x1 = _couple(tape, block.f, 0, mask, x1, x2)  # Y1 = X1 + F(X2)
            x2 = _couple(tape, block.g, 1, mask, x2, x1)  # Y2 = X2 + G(Y1)
        tape.streams, tape.top = [x1.detach(), x2.detach()], len(tape.couplings) - 1
        return x1, x2


def _couple(tape: _Tape, fn: nn.Module, target: int, mask: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
    """Record one coupling on the tape (its random state is taken just before fn runs) and apply it."""
    device = b.device
    rng = _RNGState.capture(device) if fn.training else None
    tape.couplings.append(_Coupling(fn, target, mask, rng, _AutocastState.capture(device)))
    params = [p for p in fn.parameters() if p.requires_grad]
    return _CouplingFunction.apply(a, b, tape, len(tape.couplings) - 1, *params)
