"""What a recomputation in backward must reproduce, and where its gradients go.

* `RNGState` / `AutocastState`: the random generators and autocast settings in force when the forward
  ran, re-entered by the recomputation so it computes exactly what the forward did.
* `is_stochastic(fn)`: whether fn draws random numbers at all (only then is the RNG captured and replayed,
  and only then may the recomputation not be split into chunks).
* `BufferState`: the buffers fn's forward changed (BatchNorm's running statistics), as they were before it;
  a recomputation runs on copies of them, so it computes what the forward did and updates nothing twice.
* `input_unchanged`, `first_derivatives_only`: what the engine cannot do, refused with what to do instead
  (an fn that writes over its input; a backward with `create_graph=True`).
* `backprop(out, leaf, d_out, params)`: back-propagate a recomputed piece. Parameter gradients go straight
  into `.grad` as autograd produces them, one at a time, unless the outer call is `torch.autograd.grad`,
  in which case they are handed back (nothing may touch `.grad` then).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .hooks import recomputation

__all__ = ["RNGState", "AutocastState", "is_stochastic", "BufferState", "input_unchanged", "first_derivatives_only",
           "gradient_nodes", "outer_accumulates", "stand_ins", "parameters_swapped", "gradient_root", "backprop",
           "gradient_buffer", "stream_precision", "Record"]


@dataclass
class RNGState:
    """Generator states of the CPU and (optionally) one CUDA device, captured at one instant."""

    cpu: Tensor
    cuda: Optional[Tensor] = None
    device: Optional[torch.device] = None

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
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
class AutocastState:
    """The autocast settings in force when the forward ran, to be re-entered by the recomputation."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind),
                   torch.is_autocast_cache_enabled())

    def enter(self):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)


def stream_precision(module: nn.Module, x: Tensor) -> Tensor:
    """Under autocast, a low-precision input (a bf16 stage transition's output) is raised to `module`'s
    parameters' dtype: the streams, their sums and their inversion stay exact; F and G still compute in
    low precision. Without autocast inputs pass unchanged."""
    if not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        return x
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None or x.dtype == param.dtype or x.element_size() >= param.element_size():
        return x
    return x.to(param.dtype)


def is_stochastic(fn) -> bool:
    """Whether `fn` (in training mode) draws random numbers: it says so (`fn.stochastic`), or one of its
    modules is a dropout with p > 0 or has a positive `attn_drop` / `drop` rate."""
    if not getattr(fn, "training", False):
        return False
    declared = getattr(fn, "stochastic", None)
    if declared is not None:
        return bool(declared)
    for m in fn.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if any(isinstance(getattr(m, a, 0), float) and getattr(m, a) > 0 for a in ("attn_drop", "drop")):
            return True
    return False


class BufferState:
    """fn's buffers that its forward changes (BatchNorm's running statistics, spectral norm's power-iteration
    vectors), as they were before the forward. A recomputation runs on copies of these: it computes what the
    forward computed, and the forward's update is the only one that stands. Free for a fn without buffers
    (every revvit model)."""

    def __init__(self, fn):
        self.watched = [(m, name, buf) for m in fn.modules() for name, buf in m._buffers.items() if buf is not None]
        self.before: list = []  # (module, name, value before the forward) of each buffer the forward changed

    def splittable(self, forward: bool) -> bool:
        """Whether fn may run in pieces: in the forward not with buffers in training (each piece might update
        them again), in the recomputation only if the forward changed none (a constant index table may)."""
        return not any(m.training for m, _, _ in self.watched) if forward else not self.before

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Around the forward's call of fn: keep the value before it of each buffer the call changes."""
        kept = [(m, name, buf, buf._version, buf.clone()) for m, name, buf in self.watched]
        yield
        self.before = [(m, name, value) for m, name, buf, version, value in kept  # kernels (BatchNorm's) may
                       if buf._version != version or not torch.equal(buf, value)]  # write without a version bump

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Around a recomputation: the buffers the forward changed hold a copy of their value before it."""
        live = [(m, name, m._buffers[name]) for m, name, _ in self.before]
        for m, name, value in self.before:
            m._buffers[name] = value.clone()  # the recomputation may change it; a later one needs it again
        try:
            yield
        finally:
            for m, name, buf in live:
                m._buffers[name] = buf


@contextmanager
def input_unchanged(x: Tensor, fn) -> Iterator[None]:
    """Refuse an fn that wrote over its input `x` in the body (an in-place op on it, e.g. `ReLU(inplace=True)`
    first): the engine rebuilds the streams from the very tensors F and G read."""
    version = x._version
    yield
    if x._version != version:
        raise RuntimeError(f"{type(fn).__name__} changed its input in place (an in-place op on it, such as a leading "
                           "ReLU(inplace=True)): F and G of a reversible block must leave their input unchanged, "
                           "the engine needs it to rebuild the streams; make that op out of place")


def first_derivatives_only() -> None:
    """Refuse a backward that records a graph (`create_graph=True`: a gradient penalty, a Hessian-vector
    product): the reversible backward frees what it rebuilds and gives first derivatives only."""
    if torch.is_grad_enabled():
        raise RuntimeError("reversible backprop gives first derivatives only: a backward with create_graph=True (a "
                           "gradient penalty, double backward) needs set_backprop('autograd')")


def gradient_nodes(params: Sequence[Tensor]) -> list:
    """The autograd nodes that accumulate into each parameter's `.grad` (taken in the forward, where grad
    mode is on)."""
    with torch.enable_grad():
        return [get_gradient_edge(p).node for p in params]


def outer_accumulates(nodes: Sequence) -> Optional[list[bool]]:
    """For each parameter's `gradient_nodes` entry, whether the backward now running will accumulate into
    its `.grad`; None when the running call is `torch.autograd.grad` (gradients are returned, not
    accumulated)."""
    try:
        return [torch._C._will_engine_execute_node(node) for node in nodes]
    except RuntimeError:  # "... we are currently running autograd.grad()"
        return None


def stand_ins(params: Sequence[Tensor], accumulate: Optional[list[bool]]) -> dict[int, Tensor]:
    """For each parameter whose `.grad` the outer backward accumulates: a stand-in leaf sharing its storage
    and whose `.grad` *is* the parameter's `.grad` (created as zeros if missing). A recomputation that uses
    the stand-ins (`parameters_swapped`) has autograd add each gradient into `.grad` in place as soon as it
    is made; the parameter's own accumulation node still runs once, in the outer backward (with nothing
    to add), so hooks on it (DDP's gradient buckets) fire once per step whatever the number of pieces."""
    swap: dict[int, Tensor] = {}
    for p, acc in zip(params, accumulate or ()):
        if acc:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            alias = p.detach().requires_grad_(True)
            alias.grad = p.grad
            alias.revvit_stand_in = True  # see `gradient_buffer`
            swap[id(p)] = alias
    return swap


def gradient_buffer(t: Optional[Tensor]) -> Optional[Tensor]:
    """The `.grad` a layer may add `t`'s gradient into itself, in place (instead of handing autograd a new
    tensor to add): set only for the engine's `stand_ins` during a recomputation. None otherwise."""
    if t is None or not getattr(t, "revvit_stand_in", False):
        return None
    return t.grad


@contextmanager
def parameters_swapped(modules, swap: dict[int, Tensor]) -> Iterator[None]:
    """Within the body, `modules` hold the stand-ins of `swap` (by parameter identity) as parameters."""
    changed = []
    for m in modules:
        for name, p in m._parameters.items():
            if p is not None and id(p) in swap:
                changed.append((m, name, p))
                m._parameters[name] = swap[id(p)]
    try:
        yield
    finally:
        for m, name, p in changed:
            m._parameters[name] = p


def gradient_root(out: Tensor) -> Optional[GradientEdge]:
    """Where back-propagation from `out` starts, without `out` itself (whose memory may then be freed:
    the graph keeps what it needs); None when `out` depends on nothing that takes a gradient."""
    return get_gradient_edge(out) if out.grad_fn is not None else None


def backprop(out: Optional[GradientEdge], leaf: Tensor, d_out: Tensor, params: Sequence[Tensor],
             accumulate: Optional[list[bool]]) -> tuple[Optional[Tensor], list[Optional[Tensor]]]:
    """d leaf = (d out/d leaf)^T d_out, and the gradients (d out/d W)^T d_out of `params` (the tensors the
    recomputation used as parameters: the parameters, or their `stand_ins`). `out`: a `gradient_root`.

    `accumulate` (from `outer_accumulates`): None hands every parameter gradient back (autograd.grad);
    otherwise autograd accumulates the gradient of each parameter marked True into its `.grad` as soon as
    it is made (never all of them alive at once), the others are not computed, and the list is all None.
    """
    if out is None:
        return None, [None] * len(params)
    if accumulate is None:
        d_leaf, *d_params = torch.autograd.grad(out, [leaf, *params], d_out, allow_unused=True)
        return d_leaf, d_params
    torch.autograd.backward(out, d_out, inputs=[leaf, *(p for p, a in zip(params, accumulate) if a)])
    d_leaf, leaf.grad = leaf.grad, None
    return d_leaf, [None] * len(params)


@dataclass
class Record:
    """One coupling as the forward ran it: streams[target] += DropPath(fn(streams[1 - target]))."""

    block: nn.Module
    fn: object  # F or G (an nn.Module, or a callable with `parameters()` and `training`)
    target: int
    first_of_its_stream: bool  # its input stream is the stack's input, kept on the tape
    mask: Optional[Tensor]
    rng: Optional[RNGState]  # None: fn draws no random numbers
    autocast: AutocastState
    buffers: BufferState  # what fn's forward changed of its buffers, as it was before
    sharded: bool  # FSDP2: gather the block's parameters before a recomputation
    params: list[Tensor]  # fn's trainable parameters, as the forward saw them (inputs of the coupling)
    gradient_nodes: list  # where autograd accumulates each of their .grad
    fused: bool = False  # fn adds itself in the forward and takes itself back out (see _Tape.fused)

    def call(self, b: Tensor, part: Optional[tuple[int, int]] = None, replay: bool = True,
             swap: Optional[dict[int, Tensor]] = None, how=None) -> tuple[Tensor, list[Tensor]]:
        """(fn(b), fn's trainable parameters as seen by the call: DropPath is the caller's, see `drop_path`);
        `part` = (k, n): only the k-th of n summands of fn; `how(b)` instead of fn(b) (a coupling that runs
        itself). `replay`: a recomputation (`hooks.recomputing()`), with the forward's random draws, autocast
        state and buffers (the forward runs with the live ones). `swap`: stand-ins in place of parameters."""
        if replay and self.sharded:
            self.block.unshard()  # FSDP2's pre-backward has usually done it already (then a no-op)
        if b.requires_grad and not torch.is_grad_enabled():
            # no graph (the forward, an inversion): fn sees b detached. A slice of the Function's input taken
            # there has requires_grad but no gradient function, which module hooks that watch inputs'
            # gradients (FlopCounterMode's module tracker) cannot hook
            b = b.detach()
        elif b.requires_grad and b.is_leaf:
            # fn sees a view, not the leaf: module hooks that watch inputs' gradients (FlopCounterMode's
            # module tracker) may not be given a leaf while a backward runs
            b = b.view_as(b)
        random = self.rng.replay() if replay and self.rng is not None else nullcontext()
        with random, (self.autocast.enter() if replay else nullcontext()), \
                (self.buffers.replay() if replay else self.buffers.forward()), input_unchanged(b, self.fn), \
                (recomputation() if replay else nullcontext()), parameters_swapped(self.fn.modules(), swap or {}):
            params = [p for p in self.fn.parameters() if p.requires_grad]
            y = how(b) if how else self.fn(b) if part is None else self.fn.forward_part(b, *part)
        return y, params
