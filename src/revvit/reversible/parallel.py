"""PaReprop's schedule for "parallel" backprop: the recomputation of the coupling below runs on a side CUDA
stream while the gradients of the current one run on the caller's stream."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["recompute_ahead"]

Pending = tuple[Tensor, Tensor, list[Tensor], Optional[torch.cuda.Event]]


def recompute_ahead(call: Callable[..., tuple[Tensor, list[Tensor]]], source: Tensor, index: int,
                    swap: dict[int, Tensor]) -> Pending:
    """Start `call(leaf, swap=swap)` (a coupling's recomputation, with a graph from `leaf`, a detached
    `source`) now: (leaf, output, parameters as the call saw them, the event that marks it done).

    On CUDA it runs on side stream `index % 2`: the graph's backward then runs there too (autograd runs a
    backward op on its forward op's stream), so the recomputation and gradients of neighbouring couplings
    overlap on two alternating streams. On CPU it runs now, in order (event None)."""
    if source.device.type != "cuda":
        leaf = source.detach().requires_grad_(True)
        with torch.enable_grad():
            return (leaf, *call(leaf, swap=swap), None)
    main, side = torch.cuda.current_stream(source.device), _side_streams(source.device)[index % 2]
    side.wait_stream(main)  # the streams were rebuilt on the main stream
    with torch.cuda.stream(side), torch.enable_grad():
        leaf = source.detach().requires_grad_(True)
        out, params = call(leaf, swap=swap)
        ready = torch.cuda.Event()
        ready.record(side)
    source.record_stream(side)  # freed on the host while the side stream may still read it
    out.record_stream(main)  # made on the side stream, read on the main one by the rebuild
    return leaf, out, params, ready


_SIDE_STREAMS: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """The two side streams of "parallel" on `device`, made once and owned by the engine."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _SIDE_STREAMS[device]
