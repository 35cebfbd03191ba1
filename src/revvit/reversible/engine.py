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

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from . import pieces as chunks
from .replay import (
    AutocastState,
    RNGState,
    backprop,
    gradient_nodes,
    is_stochastic,
    outer_accumulates,
    parameters_swapped,
    stand_ins,
)

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

    def forward(self, x1: Tensor, x2: Optional[Tensor] = None, *, run=None):
        """Plain (1) and (2) under ordinary autograd.

        `run`: the reversible engine runs its own couplings as `block(x1, x2, run=couplings)` when the block
        carries hooks (FSDP2's `fully_shard`): the hooks then see the block's inputs and outputs, gather
        the parameters for the forward, and bracket the block's whole backward (both recomputations) with
        their pre- and post-backward steps, which gather the parameters again and reduce-scatter the
        gradients once."""
        if run is not None:
            return run(x1, x2)
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
    "parallel"), whatever the depth. In "reversible" mode that recomputation is further split into
    pieces when F or G allows it (see `set_chunking`), so at most one piece's activations are alive.
    In "autograd" mode the blocks run under ordinary autograd. Without grad recording every mode runs
    the same plain forward.
    """

    def __init__(self, blocks: Sequence[ReversibleBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.backprop = "reversible"
        self.chunk_bytes: Optional[int] = None

    def set_backprop(self, mode: str) -> None:
        if mode not in BACKPROP_MODES:
            raise ValueError(f"backprop mode must be one of {BACKPROP_MODES}, got {mode!r}")
        self.backprop = mode

    def set_chunking(self, chunk_bytes: Optional[int] = None) -> None:
        """How "reversible" mode splits the recomputation of F and G in backward.

        A function that is per-token (`fn.token_wise = True`, e.g. an MLP) is recomputed and
        back-propagated over slices of the tokens; one that is a sum of parts (`fn.max_parts > 1` and
        `fn.forward_part(x, k, n)`, e.g. attention over groups of heads) one part at a time. Each piece's
        activations are estimated as 16x its share of the input, and pieces are made so that this stays
        under `chunk_bytes`. None (default): automatic, two pieces (the cheap half of the saving: Rev-ViT-S
        5.46 -> 4.17 MB per image at about the same step time), and no splitting when a whole recomputation
        is below 16 MiB (it would only cost time). 0: never split. A small budget (e.g. 1) splits as far as
        F and G allow: least memory (3.09 MB per image), slower steps.
        Functions that draw random numbers (dropout) are never split. The forward computes in the same
        pieces. The gradients are the same either way (up to rounding).
        """
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 0):
            raise ValueError(f"chunk_bytes must be None (automatic), 0 (off) or a number of bytes, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes

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
        return _run_reversible(blocks, x1, x2, self.backprop == "parallel", self.chunk_bytes)

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


@torch.compiler.disable
def _run_reversible(blocks: Sequence[ReversibleBlock], x1: Tensor, x2: Tensor, parallel: bool,
                    chunk_bytes: Optional[int]) -> tuple[Tensor, Tensor]:
    """The reversible forward: every coupling through `_CouplingFunction`, recorded on one tape.

    torch.compile does not trace into it: the stack is one graph break, whatever its depth (dynamo would
    otherwise break at every coupling and recompile per tape length); the layers around it compile."""
    tape = _Tape(x1, x2, parallel=parallel, chunk_bytes=chunk_bytes)
    for block in blocks:
        if _sharded(block):  # FSDP2: called, so that its hooks gather parameters and bracket its backward
            x1, x2 = block(x1, x2, run=partial(tape.forward_block, block))
        else:
            x1, x2 = tape.forward_block(block, x1, x2)
    tape.end_forward([x1, x2])
    return x1, x2


def _drop(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """DropPath with a mask drawn beforehand (None: keep everything)."""
    return x if mask is None else x * mask


def _sharded(block: nn.Module) -> bool:
    """Whether `block` is sharded by FSDP2 (`fully_shard`): it must be called, not bypassed, in the forward,
    and its parameters gathered (`unshard`, a no-op when they are) before a recomputation."""
    fsdp = getattr(torch.distributed, "fsdp", None) if torch.distributed.is_available() else None
    return fsdp is not None and isinstance(block, getattr(fsdp, "FSDPModule", ()))


# -- one forward call's record ----------------------------------------------------------------------

class _Tape:
    """What one forward call of a stack leaves for its backward.

    `inputs`: the stack's two input streams (one tensor when both are the same, as in every revvit model).
    `records[i]`: coupling i as the forward ran it. `streams`: the two streams right after coupling `top`,
    the last one not yet walked back (at first: the stack's output); in "reversible" mode the tape owns
    them and rebuilds them in place. `pending` ("parallel" only): recomputations started early.
    """

    def __init__(self, x1: Tensor, x2: Tensor, parallel: bool = False, chunk_bytes: Optional[int] = None):
        self.inputs = [x1.detach(), x2.detach()]
        self.records: list[_Record] = []
        self.streams: list[Tensor] = []
        self.top = -1
        self.parallel = parallel
        self.chunk_bytes = chunk_bytes
        self.owns_streams = False
        self.pending: dict[int, tuple[Tensor, Tensor, list[Tensor], Optional[torch.cuda.Event]]] = {}
        self.on_side_stream = False  # the coupling being walked back was recomputed on a side stream
        self.plans: dict[int, tuple[Optional[list[bool]], dict[int, Tensor]]] = {}

    # forward
    def forward_block(self, block: ReversibleBlock, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """(1) then (2), each coupling recorded; the block's drop-path mask drawn first, as in its forward."""
        streams, mask = [x1, x2], block.sample_mask(x1)
        for fn, t in block.couplings():
            streams[t] = self.couple(block, fn, t, mask, streams[t], streams[1 - t])
        return streams[0], streams[1]

    def couple(self, block: nn.Module, fn, target: int, mask: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
        """Record a coupling (its random state taken just before fn runs, if fn is random at all) and apply
        it: a + DropPath(fn(b))."""
        rng = RNGState.capture(b.device) if is_stochastic(fn) else None
        first = all(r.target != target for r in self.records)
        params = [p for p in fn.parameters() if p.requires_grad]
        self.records.append(_Record(block, fn, target, first, mask, rng, AutocastState.capture(b.device),
                                    _sharded(block), params, gradient_nodes(params)))
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
        if not self.owns_streams:  # the stack's output: copied only if someone else still holds it
            self.streams = [s if chunks.sole_user(s) else s.clone() for s in self.streams]
            self.owns_streams = True
        with torch.no_grad():
            while self.top > index:
                r = self.records[self.top]
                self.streams[r.target] = self.streams[r.target] - r.call(self.streams[1 - r.target])[0]
                self.pending.pop(self.top, None)
                self.top -= 1
        return self.streams

    def gradient_plan(self, index: int) -> tuple[Optional[list[bool]], dict[int, Tensor]]:
        """Where coupling `index`'s parameter gradients go: `accumulate` (None: handed back to
        autograd.grad; else per parameter, into `.grad` or not at all) and the stand-ins that take them
        into `.grad` in place (for FSDP2, the gathered parameters' `.grad`, which its hooks reduce-scatter)."""
        if index not in self.plans:
            r = self.records[index]
            accumulate = outer_accumulates(r.gradient_nodes)
            self.plans[index] = (accumulate, stand_ins(r.params, accumulate))
        return self.plans[index]

    def end_gradients(self, index: int) -> None:
        for alias in self.plans.pop(index, (None, {}))[1].values():
            alias.grad = None  # the parameter keeps it

    def pieces(self, index: int, b: Tensor) -> list:
        """How coupling `index` is computed, forward and backward alike, from the stream `b` its fn reads:
        [None] (whole), token slices, or (part, parts) pairs."""
        r = self.records[index]
        if self.parallel or r.rng is not None or self.chunk_bytes == 0:
            return [None]
        return chunks.pieces(r.fn, b, self.chunk_bytes)

    def recompute_piece(self, index: int, piece) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(leaf, DropPath(fn(leaf)) or its piece, fn's parameters as the call saw them), with a graph from
        the leaf: started earlier on a side stream ("parallel"), or computed now."""
        self.on_side_stream = False
        if index in self.pending:
            leaf, out, params, ready = self.pending.pop(index)
            if ready is not None:
                torch.cuda.current_stream(leaf.device).wait_event(ready)  # a stream waits; the host does not
                self.on_side_stream = True
            return leaf, out, params
        r = self.records[index]
        b = self.streams[1 - r.target]
        leaf = (b if not isinstance(piece, slice) else b[:, piece]).detach().requires_grad_(True)
        with torch.enable_grad():
            out, params = r.call(leaf, piece if isinstance(piece, tuple) else None, swap=self.gradient_plan(index)[1])
        return leaf, out, params

    def rebuild_input(self, index: int, piece, fn_b: Tensor) -> None:
        """Take (the piece of) this coupling's output back to its input: equation (3) or (4), in place on
        the tape's own stream in "reversible" mode. The first coupling of a stream takes the kept input."""
        r = self.records[index]
        if r.first_of_its_stream:
            if piece is None:
                self.streams[r.target] = self.inputs[r.target]  # kept: exact, not a reconstruction
            return  # pieces: see finish_rebuild
        with torch.no_grad():
            if self.parallel:
                self.streams[r.target] = self.streams[r.target] - fn_b  # X = Y - DropPath(fn(...))
            elif isinstance(piece, slice):
                self.streams[r.target][:, piece].sub_(fn_b)
            else:
                self.streams[r.target].sub_(fn_b)

    def finish_rebuild(self, index: int) -> None:
        r = self.records[index]
        if r.first_of_its_stream:
            self.streams[r.target] = self.inputs[r.target]  # kept: exact, not a reconstruction
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
            leaf = source.detach().requires_grad_(True)
            with torch.enable_grad():
                self.pending[index] = (leaf, *r.call(leaf, swap=self.gradient_plan(index)[1]), None)
            return
        main, side = torch.cuda.current_stream(source.device), _side_streams(source.device)[index % 2]
        side.wait_stream(main)  # the streams were rebuilt on the main stream
        with torch.cuda.stream(side), torch.enable_grad():
            leaf = source.detach().requires_grad_(True)
            out, params = r.call(leaf, swap=self.gradient_plan(index)[1])
            ready = torch.cuda.Event()
            ready.record(side)
        source.record_stream(side)  # freed on the host while the side stream may still read it
        out.record_stream(main)  # made on the side stream, read on the main one by the rebuild
        self.pending[index] = (leaf, out, params, ready)


_SIDE_STREAMS: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """The two side streams of "parallel" on `device`, made once and owned by the engine."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _SIDE_STREAMS[device]


@dataclass
class _Record:
    """One coupling as the forward ran it: streams[target] += DropPath(fn(streams[1 - target]))."""

    block: nn.Module
    fn: object  # F or G (an nn.Module, or a callable with `parameters()` and `training`)
    target: int
    first_of_its_stream: bool  # its input stream is the stack's input, kept on the tape
    mask: Optional[Tensor]
    rng: Optional[RNGState]  # None: fn draws no random numbers
    autocast: AutocastState
    sharded: bool  # FSDP2: gather the block's parameters before a recomputation
    params: list[Tensor]  # fn's trainable parameters, as the forward saw them (inputs of the coupling)
    gradient_nodes: list  # where autograd accumulates each of their .grad

    def call(self, b: Tensor, part: Optional[tuple[int, int]] = None, replay: bool = True,
             swap: Optional[dict[int, Tensor]] = None) -> tuple[Tensor, list[Tensor]]:
        """(DropPath(fn(b)), fn's trainable parameters as seen by the call); `part` = (k, n): only the k-th
        of n summands of fn. `replay`: a recomputation, with the forward's random draws and autocast state
        (the forward itself runs with the live ones). `swap`: stand-ins used in place of parameters."""
        if replay and self.sharded:
            self.block.unshard()  # FSDP2's pre-backward has usually done it already (then a no-op)
        if b.requires_grad and b.is_leaf and torch.is_grad_enabled():
            # fn sees a view, not the leaf: module hooks that watch inputs' gradients (FlopCounterMode's
            # module tracker) may not be given a leaf while a backward runs
            b = b.view_as(b)
        random = self.rng.replay() if replay and self.rng is not None else nullcontext()
        with random, (self.autocast.enter() if replay else nullcontext()), \
                parameters_swapped(self.fn.modules(), swap or {}):
            params = [p for p in self.fn.parameters() if p.requires_grad]
            y = self.fn(b) if part is None else self.fn.forward_part(b, *part)
        return _drop(y, self.mask), params


# -- the backward, one coupling at a time -----------------------------------------------------------

class _CouplingFunction(torch.autograd.Function):
    """out = a + DropPath(fn(b)), run without a graph. Its backward is one half of (5) or (6)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, tape: _Tape, index: int, *params: Tensor) -> Tensor:
        ctx.tape, ctx.index, ctx.params = tape, index, params
        r = tape.records[index]
        pieces = tape.pieces(index, b)
        if pieces == [None]:
            return a + r.call(b, replay=False)[0]
        out = a.clone()  # the same pieces as the backward's: at most one piece's activations at a time
        for piece in pieces:
            if isinstance(piece, slice):
                out[:, piece] += r.call(b[:, piece], replay=False)[0]
            else:
                out += r.call(b, piece, replay=False)[0]
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        tape, index = ctx.tape, ctx.index
        tape.streams_after(index)  # (..., Y) as this coupling left them; b = the stream fn read
        # None: autograd.grad is running and wants the parameter gradients back
        accumulate = tape.gradient_plan(index)[0]
        d_b, d_params = None, None
        b = tape.streams[1 - tape.records[index].target]
        for piece in tape.pieces(index, b):  # the whole of fn, token slices, or summands
            # recompute fn(b) with a graph: G(Y1) in (5), F(X2) in (6)
            leaf, fn_b, params = tape.recompute_piece(index, piece)
            # rebuild this coupling's input: X2 = Y2 - G(Y1) (3), or X1 = Y1 - F(X2) (4)
            tape.rebuild_input(index, piece, fn_b.detach())
            if tape.parallel:
                tape.prefetch(index - 1)  # the coupling below recomputes while this one back-propagates
            # back-propagate: d b += (d fn/d b)^T d out (dY1 in (5), dX2 in (6)); d W_fn = (d fn/d W)^T d out,
            # added to .grad as it is made (or handed back under autograd.grad)
            d = d_out if not isinstance(piece, slice) else d_out[:, piece]
            d_leaf, d_piece_params = backprop(fn_b, leaf, d, params, accumulate)
            del fn_b, leaf
            d_b = chunks.gather(d_b, d_leaf, piece, b)
            d_params = d_piece_params if d_params is None else list(map(chunks.add, d_params, d_piece_params))
            del d_leaf, d_piece_params  # not alive during the next piece's recomputation
        tape.finish_rebuild(index)
        tape.end_gradients(index)
        if tape.on_side_stream:  # made by backward ops on the side stream, used from here on the caller's
            main = torch.cuda.current_stream(d_out.device)
            for g in (d_b, *d_params):
                if g is not None:
                    g.record_stream(main)
        # the target stream's gradient passes unchanged (dX1 = dY1, dX2's identity part): autograd adds it.
        # A view of a larger gradient (both streams' gradients as halves of one buffer, as a head that
        # concatenates the streams makes them) is copied out, so the buffer is freed with the other half
        passthrough = d_out if d_out._base is None or tape.parallel else d_out.clone()
        return (passthrough, d_b, None, None, *d_params)
