"""Reversible two-stream stacks and their memory-efficient backward (Mangalam et al., CVPR 2022).

The algorithm
-------------
A reversible block maps two streams (X1, X2) to (Y1, Y2) with two residual functions F and G::

    (1)  Y1 = X1 + F(X2)
    (2)  Y2 = X2 + G(Y1)

It is exactly invertible, so a block's input can be rebuilt from its output::

    (3)  X2 = Y2 - G(Y1)
    (4)  X1 = Y1 - F(X2)

Backpropagation walks the blocks from the last to the first. Given (Y1, Y2) and (dY1, dY2)::

    (5)  recompute G(Y1) with a graph:  dY1 <- dY1 + (dG/dY1)^T dY2,   dW_G = (dG/dW_G)^T dY2;  rebuild X2 by (3)
    (6)  recompute F(X2) with a graph:  dX2  = dY2 + (dF/dX2)^T dY1,   dW_F = (dF/dW_F)^T dY1;  rebuild X1 by (4)
         dX1 = dY1

and hands (X1, X2), (dX1, dX2) to the block below. Only a stack's output is kept from the forward pass;
a block's activations exist only while that block is walked back, so memory does not grow with depth.

How the code does it
--------------------
(1) and (2) are each an *additive coupling*: one stream gets a function of the other added::

    stream[t] <- stream[t] + DropPath(fn(stream[1 - t]))      (fn, t) = (F, 0) for (1), then (G, 1) for (2)

`ReversibleBlock.couplings` defines that order once; the block's plain forward and the stack's
reversible forward both follow it. Each coupling is one autograd Function, `_CouplingFunction`, whose
inputs include fn's parameters and which saves no tensor. Its backward is one half of (5) or (6):
recompute fn with a graph, back-propagate d stream[t] through it, rebuild the coupling's input. Autograd
calls these backwards in reverse order and adds the identity path (d stream[t] passes through
unchanged) for us. What they share lives on the forward call's `_Tape`: the stack's input, one record
per coupling, and the two streams as they stand after the couplings not yet walked back.

Guarantees (each checked by tests/test_reversible.py):

* Exact gradients, equal to plain autograd on the same weights (fp64 to 1e-10).
* `torch.autograd.grad(loss, params)` works, and a frozen stem still trains the blocks (the parameters
  are inputs of the Functions).
* Randomness is replayed, not reseeded: each forward records each block's drop-path mask and the
  generator states (CPU and the input's CUDA device) before each F and G on *its own* tape, so runs are
  reproducible from `torch.manual_seed` and two forwards before one backward each replay their own draws.
* The forward's autocast state is re-entered for the recomputation; under autocast the streams stay in
  the parameters' precision (F and G compute in low precision, the sums and their inversion do not).
* The stack's input is kept, so the first block runs on its exact input rather than a reconstruction
  (a LayerNorm there would amplify a rounding error on an all-zero input, e.g. a dropped stage).

Modes (`ReversibleStack.set_backprop`): "reversible" (the above), "parallel" (the same, with the
recomputation of the coupling below overlapping the gradients of the current one on two alternating
CUDA streams, PaReprop's schedule; on CPU it runs in order and is identical to "reversible"), and
"autograd" (ordinary backprop keeping every activation: the reference and baseline).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["ReversibleBlock", "ReversibleStack", "BACKPROP_MODES", "records_graph"]

BACKPROP_MODES = ("reversible", "parallel", "autograd")


# -- the model-facing modules -----------------------------------------------------------------------

class ReversibleBlock(nn.Module):
    """One two-stream block built from any two residual functions F and G, equations (1) and (2).

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

    def couplings(self) -> tuple[tuple[nn.Module, int], tuple[nn.Module, int]]:
        """(fn, target stream) in the order they run: (1) adds F(X2) to stream 0, then (2) G(Y1) to stream 1."""
        return (self.f, 0), (self.g, 1)

    def sample_mask(self, x: Tensor) -> Optional[Tensor]:
        """Per-sample keep mask scaled by 1/keep, shape (B, 1, ..., 1); None when nothing is dropped."""
        if not self.training or self.drop_path == 0.0:
            return None
        keep = 1.0 - self.drop_path
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Plain (1) and (2) under ordinary autograd."""
        streams, mask = [x1, x2], self.sample_mask(x1)
        for fn, t in self.couplings():
            streams[t] = streams[t] + _drop(fn(streams[1 - t]), mask)
        return streams[0], streams[1]

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class ReversibleStack(nn.Module):
    """A sequence of :class:`ReversibleBlock` run on two streams: `forward(x1, x2) -> (y1, y2)`.

    In "reversible" and "parallel" mode with autograd recording, the blocks' activations are not kept:
    peak memory in the backward is the stack's input and output plus one F or G recomputation (two in
    "parallel"), whatever the depth. In "autograd" mode the blocks run under ordinary autograd. Without
    grad recording every mode runs the same plain forward.
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
        segment's input and output are kept. Consecutive segments chain exactly (for intermediate features)."""
        blocks = self.blocks[start:stop]
        x1, x2 = self._stream_precision(x1), self._stream_precision(x2)
        if self.backprop == "autograd" or not records_graph(self, x1, x2):
            for block in blocks:
                x1, x2 = block(x1, x2)
            return x1, x2
        tape = _Tape(x1, x2, parallel=self.backprop == "parallel")
        streams = [x1, x2]
        for block in blocks:
            mask = block.sample_mask(x1)  # one per-sample mask for F and G, drawn first as in block.forward
            for fn, t in block.couplings():
                streams[t] = tape.couple(fn, t, mask, streams[t], streams[1 - t])
        tape.end_forward(streams)
        return streams[0], streams[1]

    def _stream_precision(self, x: Tensor) -> Tensor:
        """Under autocast, a low-precision input (a bf16 stage transition's output) is raised to the
        parameters' dtype: the streams, their sums and their inversion (3)-(4) stay exact; F and G still
        compute in low precision. Without autocast inputs pass unchanged."""
        if not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            return x
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        if param is None or x.dtype == param.dtype or x.element_size() >= param.element_size():
            return x
        return x.to(param.dtype)


def records_graph(module: nn.Module, *inputs: Tensor) -> bool:
    """Whether calling `module` on `inputs` now would build an autograd graph worth saving memory on."""
    return torch.is_grad_enabled() and (any(x.requires_grad for x in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


def _drop(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """DropPath with a mask drawn beforehand (None: keep everything)."""
    return x if mask is None else x * mask


# -- one forward call's record ----------------------------------------------------------------------

class _Tape:
    """What one forward call of a stack leaves for its backward.

    `inputs`: the stack's two input streams (one tensor when both are the same, as in every revvit model).
    `records[i]`: coupling i as the forward ran it. `streams`: the two streams right after coupling `top`,
    the last one not yet walked back (at first: the stack's output). `pending` ("parallel" only):
    recomputations started early, by coupling index.
    """

    def __init__(self, x1: Tensor, x2: Tensor, parallel: bool = False):
        self.inputs = [x1.detach(), x2.detach()]
        self.records: list[_Record] = []
        self.streams: list[Tensor] = []
        self.top = -1
        self.parallel = parallel
        self.pending: dict[int, tuple[Tensor, Tensor, Optional[torch.cuda.Event]]] = {}
        self.on_side_stream = False  # the coupling being walked back was recomputed on a side stream

    # forward
    def couple(self, fn: nn.Module, target: int, mask: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
        """Record a coupling (its random state taken just before fn runs) and apply it: a + DropPath(fn(b))."""
        rng = _RNGState.capture(b.device) if fn.training else None
        first = all(r.target != target for r in self.records)
        self.records.append(_Record(fn, target, first, mask, rng, _AutocastState.capture(b.device)))
        params = [p for p in fn.parameters() if p.requires_grad]
        return _CouplingFunction.apply(a, b, self, len(self.records) - 1, *params)

    def end_forward(self, streams: list[Tensor]) -> None:
        self.streams, self.top = [s.detach() for s in streams], len(self.records) - 1

    # backward
    def streams_after(self, index: int) -> list[Tensor]:
        """The streams right after coupling `index`. Couplings above it whose backward never runs (their
        output reached no loss: always a suffix of the stack) are first inverted without a graph."""
        if index > self.top:
            raise RuntimeError(
                "reversible backward: this stack's activations were already rebuilt and released by an earlier "
                "backward through the same graph. Reversible backprop walks each forward back once (no "
                "retain_graph); use set_backprop('autograd') to backpropagate twice.")
        with torch.no_grad():
            while self.top > index:
                r = self.records[self.top]
                self.streams[r.target] = self.streams[r.target] - r.recompute(self.streams[1 - r.target])
                self.pending.pop(self.top, None)
                self.top -= 1
        return self.streams

    def recomputation(self, index: int) -> tuple[Tensor, Tensor]:
        """(b, DropPath(fn(b))) of coupling `index` with a graph from the leaf b: started earlier on a side
        stream ("parallel"), or computed now."""
        self.on_side_stream = False
        if index in self.pending:
            b, out, ready = self.pending.pop(index)
            if ready is not None:
                torch.cuda.current_stream(b.device).wait_event(ready)  # a stream waits; the host does not
                self.on_side_stream = True
            return b, out
        r = self.records[index]
        b = self.streams[1 - r.target].detach().requires_grad_(True)
        with torch.enable_grad():
            return b, r.recompute(b)

    def rebuild_input(self, index: int, fn_b: Tensor) -> None:
        """Set the streams to what they were before coupling `index`: equation (3) or (4)."""
        r = self.records[index]
        with torch.no_grad():
            if r.first_of_its_stream:
                self.streams[r.target] = self.inputs[r.target]  # kept: exact, not a reconstruction
            else:
                self.streams[r.target] = self.streams[r.target] - fn_b  # X = Y - DropPath(fn(...))
        self.top = index - 1

    def prefetch(self, index: int) -> None:
        """"parallel": start recomputing coupling `index` (the one below) now, while the caller runs the
        gradients of the coupling above. On CUDA it runs on side stream `index % 2`: the graph's backward
        then runs there too (autograd runs a backward op on its forward op's stream), so recomputation and
        gradients of neighbouring couplings overlap on two alternating streams. On CPU it runs in order."""
        if index < 0 or index in self.pending:
            return
        r = self.records[index]
        source = self.streams[1 - r.target]
        if source.device.type != "cuda":
            b = source.detach().requires_grad_(True)
            with torch.enable_grad():
                self.pending[index] = (b, r.recompute(b), None)
            return
        main, side = torch.cuda.current_stream(source.device), _side_streams(source.device)[index % 2]
        side.wait_stream(main)  # the streams were rebuilt on the main stream
        with torch.cuda.stream(side), torch.enable_grad():
            b = source.detach().requires_grad_(True)
            out = r.recompute(b)
            ready = torch.cuda.Event()
            ready.record(side)
        source.record_stream(side)  # freed on the host while the side stream may still read it
        out.record_stream(main)  # made on the side stream, read on the main one by the rebuild
        self.pending[index] = (b, out, ready)


_SIDE_STREAMS: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """The two side streams of "parallel" on `device`, made once and owned by the engine."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _SIDE_STREAMS[device]


@dataclass
class _Record:
    """One coupling as the forward ran it: streams[target] += DropPath(fn(streams[1 - target]))."""

    fn: nn.Module
    target: int
    first_of_its_stream: bool  # its input stream is the stack's input, kept on the tape
    mask: Optional[Tensor]
    rng: Optional[_RNGState]
    autocast: _AutocastState

    def recompute(self, b: Tensor) -> Tensor:
        """DropPath(fn(b)) with the forward's random draws and autocast state."""
        if b.requires_grad and b.is_leaf:
            # fn sees a view, not the leaf: module hooks that watch inputs' gradients (FlopCounterMode's
            # module tracker) may not be given a leaf while autograd.grad runs
            b = b.view_as(b)
        with (self.rng.replay() if self.rng is not None else nullcontext()), self.autocast.enter():
            return _drop(self.fn(b), self.mask)


# -- the backward, one coupling at a time -----------------------------------------------------------

class _CouplingFunction(torch.autograd.Function):
    """out = a + DropPath(fn(b)), run without a graph. Its backward is one half of (5) or (6)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, tape: _Tape, index: int, *params: Tensor) -> Tensor:
        ctx.tape, ctx.index, ctx.params = tape, index, params
        r = tape.records[index]
        return a + _drop(r.fn(b), r.mask)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        tape, index = ctx.tape, ctx.index
        tape.streams_after(index)  # (..., Y) as this coupling left them; b = the stream fn read
        # recompute fn(b) with a graph: G(Y1) in (5), F(X2) in (6)
        b, fn_b = tape.recomputation(index)
        # rebuild this coupling's input: X2 = Y2 - G(Y1) (3), or X1 = Y1 - F(X2) (4)
        tape.rebuild_input(index, fn_b)
        if tape.parallel:
            tape.prefetch(index - 1)  # the coupling below recomputes while this one back-propagates
        # back-propagate: d b += (d fn/d b)^T d out (dY1 in (5), dX2 in (6)); d W_fn = (d fn/d W)^T d out
        d_b, *d_params = torch.autograd.grad(fn_b, [b, *ctx.params], d_out, allow_unused=True)
        if tape.on_side_stream:  # made by backward ops on the side stream, used from here on the caller's
            main = torch.cuda.current_stream(d_b.device)
            for g in (d_b, *d_params):
                if g is not None:
                    g.record_stream(main)
        # the target stream's gradient passes unchanged (dX1 = dY1, dX2's identity part): autograd adds it
        return (d_out, d_b, None, None, *d_params)


# -- what a recomputation must replay -----------------------------------------------------------------

@dataclass
class _RNGState:
    """Generator states of the CPU and (optionally) one CUDA device, captured at one instant."""

    cpu: Tensor
    cuda: Optional[Tensor] = None
    device: Optional[torch.device] = None

    @classmethod
    def capture(cls, device: torch.device) -> _RNGState:
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
    def capture(cls, device: torch.device) -> _AutocastState:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind),
                   torch.is_autocast_cache_enabled())

    def enter(self):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)
