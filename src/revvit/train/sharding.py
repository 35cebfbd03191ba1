"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for revvit and timm models: `revvit train parallel=fsdp`.

Each rank holds 1/N of every parameter, gradient and optimiser state; a block's parameters are gathered
just before it runs (forward, and the recomputation in reversible backward) and its gradients
reduce-scattered once its backward is done. The units sharded are the blocks: every `ReversibleBlock`,
the non-reversible blocks between reversible runs (Rev-MViT's stage transitions), and the entries of a
model's `blocks` list (ViT, MViT); the rest (stem, norm, head) is sharded with the model itself.

Checkpoints stay ordinary: the full state (the same keys as an unsharded model's) is gathered to rank 0
and written there; resuming loads it back into the shards, so a run can switch between ddp and fsdp.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..reversible import ReversibleBlock, ReversibleStack

__all__ = ["shard_units", "shard_model", "is_sharded", "full_model_state", "full_optimizer_state",
           "load_full_model_state", "load_full_optimizer_state", "local_value", "keyed_by_name"]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one (in forward order): reversible blocks, the other members of a
    `stages` list (stage transitions), the members of a `blocks` list."""
    units = {id(m) for m in model.modules() if isinstance(m, ReversibleBlock)}
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "stages"):
            units.update(id(c) for c in m if not isinstance(c, (ReversibleStack, ReversibleBlock)))
    return [m for m in model.modules() if id(m) in units]


def shard_model(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """`fully_shard` each of `shard_units(model)`, then the model (the standard FSDP2 recipe); in place,
    returns the model. Needs an initialised process group; `fsdp_kwargs` go to every `fully_shard` call."""
    for unit in shard_units(model):
        fully_shard(unit, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict:
    """The unsharded state dict on rank 0 (on CPU), {} on the others. Every rank must call it."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's full state, keyed by parameter name, on rank 0. Every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_model_state(model: nn.Module, state: dict) -> None:
    """Load an unsharded state dict (every rank passes the whole of it) into the shards."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimiser state into the shards: keyed by parameter name (written under fsdp) or by
    position (written by `optimizer.state_dict()` under ddp or one process)."""
    if not keyed_by_name(state):
        state = _by_name(model, optimizer, state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def keyed_by_name(state: dict) -> bool:
    """Whether an optimiser state names its parameters (fsdp's checkpoints) rather than numbering them
    (`optimizer.state_dict()`); an empty state counts as numbered."""
    first = next((p for g in state["param_groups"] for p in g["params"]), 0)
    return isinstance(first, str)


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`optimizer.state_dict()`'s positional keys as parameter names (the live optimiser holds the same
    parameters in the same order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    position = {}
    for saved, live in zip(state["param_groups"], optimizer.param_groups):
        position.update({i: names[id(p)] for i, p in zip(saved["params"], live["params"])})
    groups = [{**g, "params": [position[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {position[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), any other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t
