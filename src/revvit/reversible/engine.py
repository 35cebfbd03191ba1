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
reversible forward both follow it. Each block is one autograd Function, `_BlockFunction`, whose inputs
include F's and G's parameters and which saves no tensor. Its backward is (5) then (6), each by
`_walk_back`: recompute fn with a graph, rebuild the coupling's input, back-propagate d stream[t] through
fn and add the result into d stream[1 - t] *in place* (dX1 = dY1 and dY2's identity part need no work),
so (dY1, dY2) become (dX1, dX2) in the same two buffers. What the blocks share lives on the forward
call's `_Tape`: the stack's input, one record per coupling, and the two streams as they stand after the
couplings not yet walked back.

A *fused* coupling does its own work (`fn.coupling_forward` / `coupling_backward`: Rev-ViT's attention
and MLP, Rev-MViT's MLP, see `layers.coupling`): in the forward it adds fn(b) block by block (hidden
columns, groups of heads), and in the backward, `_walk_back_fused`, it takes each block's share back out
of stream[t] (the rebuild) while back-propagating that block, so no graph of fn is built and one block's
activations are alive at a time: the same equations, computed in one pass.

Guarantees (each checked by tests/test_reversible.py):

* Exact gradients, equal to plain autograd on the same weights (fp64 to 1e-10).
* `torch.autograd.grad(loss, params)` works, and a frozen stem still trains the blocks (the parameters
  are inputs of the Functions).
* Randomness is replayed, not reseeded: each forward records each block's drop-path mask and the
  generator states (CPU and the input's CUDA device) before each F and G on *its own* tape, so runs are
  reproducible from `torch.manual_seed` and two forwards before one backward each replay their own draws.
* The forward's autocast state is re-entered for the recomputation; under autocast the streams stay in
  the parameters' precision (F and G compute in low precision, the sums and their inversion do not).
* A recomputation sees fn's buffers as the forward did and changes none (BatchNorm's running statistics).
* The stack's input is kept: the first block runs on its exact input, not a reconstruction (a LayerNorm
  there would amplify a rounding error on an all-zero input, e.g. a dropped stage).

Modes (`ReversibleStack.set_backprop`): "reversible" (the above), "parallel" (the same, the coupling
below recomputing on a side CUDA stream while the current one back-propagates: PaReprop's schedule; on
CPU identical to "reversible"), "autograd" (ordinary backprop keeping every activation: the reference).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from . import buffers
from . import pieces as chunks
from .drop_path import add_dropped, drop, mask_of, through_drop_path
from .hooks import called, has_hooks, records_graph, sharded
from .parallel import Pending, recompute_ahead
from .replay import (
    AutocastState,
    BufferState,
    Record,
    RNGState,
    backprop,
    first_derivatives_only,
    gradient_nodes,
    gradient_root,
    is_stochastic,
    outer_accumulates,
    stand_ins,
    stream_precision,
)

__all__ = ["ReversibleBlock", "ReversibleStack", "BACKPROP_MODES"]

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
            streams[t] = streams[t] + drop(fn(streams[1 - t]), mask)
        return streams[0], streams[1]

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class ReversibleStack(nn.Module):
    """A sequence of :class:`ReversibleBlock` run on two streams: `forward(x1, x2) -> (y1, y2)`.

    In "reversible" and "parallel" mode with autograd recording, the blocks' activations are not kept:
    peak memory in the backward is the stack's input and output plus what one F or G holds while it is
    walked back (two in "parallel"), whatever the depth. In "reversible" mode an F or G that can is fused
    (one block of its hidden columns or group of its heads alive at a time), and the others' recomputation
    is split into pieces where they allow it (see `set_chunking`).
    In "autograd" mode the blocks run under ordinary autograd. Without grad recording every mode runs
    the same plain forward.
    """

    def __init__(self, blocks: Sequence[ReversibleBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.backprop = "reversible"
        self.chunk_bytes: Optional[int] = None
        self.fused = True

    def set_backprop(self, mode: str) -> None:
        if mode not in BACKPROP_MODES:
            raise ValueError(f"backprop mode must be one of {BACKPROP_MODES}, got {mode!r}")
        self.backprop = mode

    def set_chunking(self, chunk_bytes: Optional[int] = None, fused: bool = True) -> None:
        """How "reversible" mode computes F and G in the forward and the backward: fused or recomputed, whole
        or in pieces (`reversible.pieces`). The gradients are the same every way (up to rounding).

        `fused` (default True): an F or G that offers it (Rev-ViT's attention and MLP, Rev-MViT's MLP:
        `layers.coupling`) adds itself to its stream in the forward and, in the backward, takes itself back
        out while back-propagating, one block of hidden columns or group of heads at a time over the whole
        batch (`_walk_back_fused`): Rev-ViT-S at batch 4 holds 2.40 MB per image (4.31 recomputed whole),
        for about 1.1x the whole recomputation's step on 2 CPU threads (head-sized products run slower).
        False: F and G are always recomputed under autograd.
        `chunk_bytes`: each piece holds at most about that many bytes (fused: by fn's own estimate; else 8x
        its share of the input), in slices of the batch (or of the tokens, per token), recomputed ones also
        in summands (`fn.forward_part`: groups of heads) where that holds less. None (default): fused ones
        whole unless they hold over 3.5x the input (then as few slices of the batch as hold that),
        recomputed ones in halves of the batch (one sample: 3 token slices of G, 2 head groups of F)
        unless under 8 MiB; 0: never split; 1: as finely as F and G allow. F and G that draw random
        numbers are never split or fused.
        """
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 0):
            raise ValueError(f"chunk_bytes must be None (automatic), 0 (off) or a number of bytes, got {chunk_bytes!r}")
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        self.chunk_bytes, self.fused = chunk_bytes, fused

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x1: Tensor, x2: Tensor, start: int = 0, stop: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Run blocks[start:stop] (all by default) as one reversible segment: of its activations only the
        segment's input and output are kept. Consecutive segments chain exactly (for intermediate features)."""
        blocks = self.blocks[start:stop]
        x1, x2 = stream_precision(self, x1), stream_precision(self, x2)
        if self.backprop == "autograd" or not records_graph(self, x1, x2):
            for block in blocks:
                x1, x2 = block(x1, x2)
            return x1, x2
        return _run_reversible(blocks, x1, x2, self.backprop == "parallel", self.chunk_bytes, self.fused)


@torch.compiler.disable
def _run_reversible(blocks: Sequence[ReversibleBlock], x1: Tensor, x2: Tensor, parallel: bool,
                    chunk_bytes: Optional[int], fused: bool) -> tuple[Tensor, Tensor]:
    """The reversible forward: every block through `_BlockFunction`, each coupling recorded on one tape.
    torch.compile does not trace into it: the stack is one graph break, whatever its depth (dynamo would
    otherwise break at every coupling and recompile per tape length); the layers around it compile."""
    tape = _Tape(x1, x2, parallel=parallel, chunk_bytes=chunk_bytes, fused=fused)
    for block in blocks:
        fsdp = sharded(block)
        if fsdp or has_hooks(block):  # called, so that its hooks run (FSDP2's gather parameters)
            x1, x2 = called(block, partial(tape.forward_block, block), x1, x2, strict=not fsdp)
        else:
            x1, x2 = tape.forward_block(block, x1, x2)
    tape.end_forward([x1, x2])
    return x1, x2


# -- one forward call's record ----------------------------------------------------------------------

class _Tape:
    """What one forward call of a stack leaves for its backward.

    `inputs`: the stack's two input streams (one tensor when both are the same, as in every revvit model).
    `records[i]`: coupling i as the forward ran it. `streams`: the two streams right after coupling `top`,
    the last one not yet walked back (at first: the stack's output); in "reversible" mode the tape owns
    them and rebuilds them in place. `pending` ("parallel" only): recomputations started early.
    """

    def __init__(self, x1: Tensor, x2: Tensor, parallel: bool = False, chunk_bytes: Optional[int] = None,
                 fused: bool = True):
        self.inputs = [x1.detach(), x2.detach()]
        self.records: list[Record] = []
        self.streams: list[Tensor] = []
        self.top = -1
        self.parallel = parallel
        self.chunk_bytes, self.use_fused = chunk_bytes, fused
        self.owns_streams = False
        self.pending: dict[int, Pending] = {}
        self.on_side_stream = False  # the coupling being walked back was recomputed on a side stream
        self.plans: dict[int, tuple[Optional[list[bool]], dict[int, Tensor]]] = {}
        self.handed: Optional[buffers.Handed] = None  # the input gradients the last block walked back returned

    # forward
    def forward_block(self, block: ReversibleBlock, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """(1) then (2) as one `_BlockFunction`, each coupling recorded; the block's drop-path mask drawn first,
        as in its plain forward. fn's trainable parameters are inputs of the Function."""
        mask, index, params = block.sample_mask(x1), len(self.records), []
        for fn, target in block.couplings():
            first = all(r.target != target for r in self.records)
            fn_params = [p for p in fn.parameters() if p.requires_grad]
            self.records.append(Record(block, fn, target, first, mask, None, AutocastState.capture(x1.device),
                                        BufferState(fn), sharded(block), fn_params, gradient_nodes(fn_params)))
            params += fn_params
        return _BlockFunction.apply(x1, x2, self, index, len(self.records) - index, *params)

    def couple(self, index: int, a: Tensor, b: Tensor) -> Tensor:
        """Apply coupling `index`, a + DropPath(fn(b)), without a graph: whole, or in pieces (see
        `pieces`); its random state is taken just before fn runs, if fn is random at all."""
        r = self.records[index]
        r.rng = RNGState.capture(b.device) if is_stochastic(r.fn) else None
        r.fused = self.fuses(index, b)
        pieces = self.pieces(index, b, forward=True)
        if r.fused:  # out += DropPath(fn(b)), by fn's own pass (see _walk_back_fused)
            out = a.clone(memory_format=torch.contiguous_format)
            for piece in pieces:
                r.call(chunks.region(b, piece), replay=False, how=partial(
                    r.fn.coupling_forward, chunks.region(out, piece), mask=mask_of(r.mask, piece)))
            return out
        if pieces == [None]:
            return add_dropped(a, r.call(b, replay=False)[0], r.mask, out_of_place=True)
        out = a.clone()
        for piece in pieces:
            part = piece if isinstance(piece, chunks.Part) else None
            add_dropped(chunks.region(out, piece), r.call(chunks.region(b, piece), part, replay=False)[0],
                        mask_of(r.mask, piece))
        return out

    def end_forward(self, streams: list[Tensor]) -> None:
        self.streams, self.top = [s.detach() for s in streams], len(self.records) - 1

    # backward
    def streams_after(self, index: int) -> list[Tensor]:
        """The streams right after coupling `index`. Couplings above it whose backward never runs (their
        output reached no loss: always a suffix of the stack) are first inverted without a graph."""
        if index > self.top:
            raise RuntimeError("reversible backward: this stack's activations were already rebuilt and released by "
                               "an earlier backward through the same graph (each forward is walked back once, no "
                               "retain_graph); use set_backprop('autograd') to backpropagate twice.")
        if not self.owns_streams:  # the stack's output: copied if someone else still holds it (or not in rows)
            self.streams = [s if chunks.sole_user(s) and s.is_contiguous() else s.clone(
                memory_format=torch.contiguous_format) for s in self.streams]
            self.owns_streams = True
        with torch.no_grad():
            while self.top > index:
                r = self.records[self.top]
                fn_b = r.call(self.streams[1 - r.target])[0]
                self.streams[r.target] = add_dropped(self.streams[r.target], fn_b, r.mask, -1, out_of_place=True)
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

    def fuses(self, index: int, b: Tensor) -> bool:
        """Whether coupling `index` is fused: its fn adds DropPath(fn(b)) to the stream (`fn.coupling_forward`)
        and, in the backward, takes it back out while back-propagating, in one pass of its own
        (`fn.coupling_backward`, see `_walk_back_fused`), rather than being recomputed under autograd. Where
        fn's class offers it (not a wrapper such as `torch.compile`'s, whose compiled call it would bypass)
        and fn can now (`fn.fuses_coupling(b)`: no hooks, no autocast, ...), fn has no random draws or
        buffers, the streams are float32 or float64 (in lower precision each block's share would be rounded
        into the stream and back out), in "reversible" mode with `fused` on. Decided in the forward."""
        r = self.records[index]
        return (self.use_fused and not self.parallel and r.rng is None and not r.buffers.watched
                and b.dtype in (torch.float32, torch.float64)
                and hasattr(type(r.fn), "coupling_backward") and r.fn.fuses_coupling(b))

    def pieces(self, index: int, b: Tensor, forward: bool = False) -> list:
        """How coupling `index` is computed (in the forward without a graph, or recomputed and
        back-propagated) from the stream `b` its fn reads: [None] (whole), slices of the batch or of the
        tokens (an index of b), or `Part`s (the k-th of n summands)."""
        r = self.records[index]
        if self.chunk_bytes == 0 or (not r.fused and (self.parallel or r.rng is not None
                                                      or not r.buffers.splittable(forward))):
            return [None]
        split = chunks.fused_pieces if r.fused else chunks.pieces
        return split(r.fn, b, self.chunk_bytes, forward=forward)

    def recompute_piece(self, index: int, piece, split: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(leaf, fn(leaf) or its piece, fn's parameters as the call saw them), with a graph from
        the leaf: started earlier on a side stream ("parallel"), or computed now (`split`: one of several
        pieces, and fn's layers may split their own work too, see `pieces.split_inside`)."""
        self.on_side_stream = False
        if index in self.pending:
            leaf, out, params, ready = self.pending.pop(index)
            if ready is not None:
                torch.cuda.current_stream(leaf.device).wait_event(ready)  # a stream waits; the host does not
                self.on_side_stream = True
            return leaf, out, params
        r = self.records[index]
        b = self.streams[1 - r.target]
        leaf = chunks.region(b, piece).detach().requires_grad_(True)
        with torch.enable_grad(), chunks.splitting(split):
            out, params = r.call(leaf, piece if isinstance(piece, chunks.Part) else None,
                                 swap=self.gradient_plan(index)[1])
        return leaf, out, params

    def rebuild_input(self, index: int, piece, fn_b: Tensor) -> None:
        """Take (the piece of) this coupling's output back to its input: equation (3) or (4), in place on
        the tape's own stream in "reversible" mode. The first coupling of a stream takes the kept input."""
        r = self.records[index]
        if r.first_of_its_stream:
            if piece is None:
                self.streams[r.target] = self.inputs[r.target]  # kept: exact, not a reconstruction
            return  # pieces: see finish_rebuild
        mask = mask_of(r.mask, piece)
        with torch.no_grad():  # X = Y - DropPath(fn(...))
            if self.parallel:
                self.streams[r.target] = add_dropped(self.streams[r.target], fn_b, mask, -1, out_of_place=True)
            else:
                add_dropped(chunks.region(self.streams[r.target], piece), fn_b, mask, -1)

    def finish_rebuild(self, index: int) -> None:
        r = self.records[index]
        if r.first_of_its_stream:
            self.streams[r.target] = self.inputs[r.target]  # kept: exact, not a reconstruction
        self.top = index - 1

    def prefetch(self, index: int) -> None:
        """"parallel": start recomputing coupling `index` (the one below) now, while the caller runs the
        gradients of the coupling above (on CUDA on a side stream, see `parallel.recompute_ahead`)."""
        if index >= 0 and index not in self.pending:
            r = self.records[index]
            self.pending[index] = recompute_ahead(r.call, self.streams[1 - r.target], index,
                                                  self.gradient_plan(index)[1])


# -- the backward, one block at a time --------------------------------------------------------------

class _BlockFunction(torch.autograd.Function):
    """(Y1, Y2) = the block's couplings (1) and (2) applied to (X1, X2), run without a graph.

    Its backward is (5) then (6): it walks the block's couplings back from the last, and adds each input
    gradient into the other stream's gradient *in place*, so a block's backward allocates no stream-sized
    gradient beyond the two it was handed: (dY1, dY2) become (dX1, dX2)."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, tape: _Tape, index: int, count: int, *params: Tensor):
        ctx.tape, ctx.index, ctx.count = tape, index, count
        ctx.set_materialize_grads(False)  # an output that reached no loss gets None, and its fn no gradient
        streams = [x1, x2]
        for i in range(index, index + count):
            t = tape.records[i].target
            streams[t] = tape.couple(i, streams[t], streams[1 - t])
        return streams[0], streams[1]

    @staticmethod
    def backward(ctx, d_y1: Tensor, d_y2: Tensor):
        first_derivatives_only()
        tape = ctx.tape
        refs = buffers.python_refs(d_y1, d_y2)  # first: before anything else refers to them
        grads = buffers.take([d_y1, d_y2], refs, tape.handed)  # [dY1, dY2], to become [dX1, dX2] in place
        tape.handed = buffers.hand_down(grads)  # the block below receives these very buffers
        d_params: list = []
        for index in reversed(range(ctx.index, ctx.index + ctx.count)):  # G's coupling (5), then F's (6)
            d_params = _walk_back(tape, index, grads) + d_params
        return grads[0], grads[1], None, None, None, *d_params


def _walk_back(tape: _Tape, index: int, grads: list[Tensor]) -> list[Optional[Tensor]]:
    """Walk coupling `index`, stream[t] = stream[t] + DropPath(fn(stream[1-t])), back: one half of (5) or (6).

    With (t, fn) = (1, G), this is (5): given Y1, Y2 and dY1, dY2 it rebuilds X2 and makes dY1 the total
    gradient of Y1; with (0, F), (6): given X2, Y1 and dY1, dX2's identity part dY2, it rebuilds X1 and
    completes dX2. d stream[t] itself passes unchanged (dX1 = dY1; dY2 is dX2's identity part). Returns
    fn's parameter gradients (all None where they went into `.grad`)."""
    r = tape.records[index]
    if grads[r.target] is None:  # stream[t] reached no loss (the last G of a stack whose Y2 is unused)
        tape.streams_after(index - 1)  # only invert the coupling; fn's parameters get no gradient
        return [None] * len(r.params)
    tape.streams_after(index)
    accumulate = tape.gradient_plan(index)[0]  # None: autograd.grad is running and wants them back
    b = tape.streams[1 - r.target]  # the stream fn read: Y1 in (5), X2 in (6)
    if r.fused:
        if accumulate is not None and r.fn.fuses_coupling(b):
            return _walk_back_fused(tape, index, grads)
        r.fused = False  # recomputed after all (autograd.grad, a hook added since the forward), in its own pieces
    d_params = None
    pieces = tape.pieces(index, b)  # the whole of fn, slices of the batch or tokens, or summands
    for piece in pieces:
        # recompute fn(b) with a graph: G(Y1) in (5), F(X2) in (6)
        leaf, fn_b, params = tape.recompute_piece(index, piece, split=len(pieces) > 1)
        # rebuild this coupling's input: X2 = Y2 - G(Y1) (3), or X1 = Y1 - F(X2) (4)
        tape.rebuild_input(index, piece, fn_b.detach())
        # fn(b)'s graph, ending in DropPath's backward (d fn(b) = mask * d stream[t]); its value is freed now
        root = gradient_root(through_drop_path(fn_b, mask_of(r.mask, piece)))
        if tape.parallel:
            tape.prefetch(index - 1)  # the coupling below recomputes while this one back-propagates
        # back-propagate d stream[t] (dY2 in (5), dY1 in (6)) through fn: (d fn/d b)^T d stream[t], and
        # d W_fn = (d fn/d W)^T d stream[t], added to .grad as it is made (or handed back under autograd.grad)
        d = chunks.region(grads[r.target], piece)
        del fn_b
        d_leaf, d_piece_params = backprop(root, leaf, d, params, accumulate)
        del root, leaf, d
        # dY1 += (dG/dY1)^T dY2 in (5), dX2 = dY2 + (dF/dX2)^T dY1 in (6): into d stream[1-t], in place
        buffers.add_into(grads, 1 - r.target, d_leaf, piece, b, tape.on_side_stream)
        d_params = d_piece_params if d_params is None else list(map(chunks.add, d_params, d_piece_params))
        del d_leaf, d_piece_params  # not alive during the next piece's recomputation
    tape.finish_rebuild(index)
    tape.end_gradients(index)
    if tape.on_side_stream:  # made by backward ops on the side stream, used from here on the caller's
        main = torch.cuda.current_stream(grads[0].device)
        for g in d_params:
            if g is not None:
                g.record_stream(main)
    return d_params


def _walk_back_fused(tape: _Tape, index: int, grads: list[Tensor]) -> list[None]:
    """`_walk_back` for a fused coupling, in one pass of fn's own per piece (the whole batch by
    default; `fn.coupling_backward`, e.g. `layers.coupling`): it takes DropPath(fn(b)) back out of
    stream[t], the rebuild (3) or (4), block by block (the backward's blocks may be finer than the
    forward's: the same sum, rounded in other places; Rev-ViT-S fp32 at depth 12: gradients 2e-7 from
    autograd's); adds fn's parameter gradients into `.grad`; and returns (dfn/db)^T (mask * d stream[t]),
    which goes into d stream[1-t] in place: (5) or (6). No graph of fn as a whole is built (attention
    builds one for a group of heads' scaled-dot-product at a time), so only one of fn's blocks of
    activations is alive at a time. The first coupling of a stream takes the kept input instead."""
    r = tape.records[index]
    b = tape.streams[1 - r.target]
    for piece in tape.pieces(index, b):
        out = None if r.first_of_its_stream else chunks.region(tape.streams[r.target], piece)
        backward = partial(r.fn.coupling_backward, out, d=chunks.region(grads[r.target], piece),
                           mask=mask_of(r.mask, piece))
        d_b, _ = r.call(chunks.region(b, piece), swap=tape.gradient_plan(index)[1], how=backward)
        buffers.add_into(grads, 1 - r.target, d_b, piece, b)
        del d_b
    tape.finish_rebuild(index)
    tape.end_gradients(index)
    return [None] * len(r.params)
