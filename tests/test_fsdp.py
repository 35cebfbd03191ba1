"""FSDP2 (`fully_shard`): the reversible engine under sharded parameters, and `revvit train parallel=fsdp`.

Two gloo processes on CPU. Each sharded step is compared with the same step of an unsharded copy of the
model (same weights, same input half, same random draws) whose gradients are averaged over the ranks,
as FSDP's reduce-scatter averages them.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import weighted_sum
from revvit.train import checkpoint as ckpt
from revvit.train import fit
from revvit.train.sharding import local_value, shard_model, shard_units
from test_models import NAMES, example_input, small
from test_train import spawn_two, tiny, torchrun_env

REVERSIBLE = [n for n in NAMES if hasattr(small(n), "set_chunking")]
CASES = [("reversible", 0), ("reversible", 1), ("parallel", None)]  # (backprop, chunk_bytes: 0 off, 1 finest)


def _join(rank: int, port: int) -> None:
    torchrun_env(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _gradient_errors(rank: int, port: int, out: str) -> None:
    """For every reversible model and case: the largest relative gradient difference, sharded vs not."""
    _join(rank, port)
    torch.set_num_threads(1)
    errors = {}
    for name in REVERSIBLE:
        for mode, chunk in CASES:
            reference = small(name, num_classes=5, drop_path_rate=0.2).double().train()
            reference.set_backprop("autograd")
            model = copy.deepcopy(reference).set_backprop(mode)
            if chunk is not None:
                model.set_chunking(chunk)
            shard_model(model)
            x = example_input(reference, batch=4).double()[2 * rank:2 * rank + 2]
            for step in range(2):  # the second accumulates into the first's gradients
                for m in (reference, model):
                    torch.manual_seed(100 * rank + step)  # each rank its own drop-path draws, the same in both
                    weighted_sum(m(x)).backward()
            worst = 0.0
            for p, q in zip(reference.parameters(), model.parameters()):
                dist.all_reduce(p.grad)
                expected = p.grad / 2
                scale = max(expected.norm().item(), 1e-3)
                worst = max(worst, (local_value(q.grad) - expected).norm().item() / scale)
            errors[f"{name}/{mode}/chunk={chunk}"] = worst
    if rank == 0:
        with open(out, "w") as f:
            json.dump(errors, f)
    dist.destroy_process_group()


def test_sharding_covers_every_block_and_transition():
    model = small("rev_mvit_tiny")
    units = shard_units(model)
    blocks = [m for s in model.stages if hasattr(s, "blocks") for m in s.blocks]
    transitions = [s for s in model.stages if not hasattr(s, "blocks")]
    assert units == [u for u in model.modules() if any(u is b for b in blocks + transitions)]
    assert len(blocks) > 0 and len(transitions) > 0


def test_fsdp2_gradients_equal_the_unsharded_model_for_every_reversible_model(tmp_path):
    spawn_two(_gradient_errors, str(tmp_path / "errors.json"))
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert len(errors) == len(REVERSIBLE) * len(CASES)
    bad = {case: err for case, err in errors.items() if not err < 1e-10}
    assert not bad, f"sharded gradients differ from the unsharded model's: {bad}"


def _mixed_precision_errors(rank: int, port: int, out: str) -> None:
    """bf16 parameters for compute, fp32 reduction (FSDP2's `MixedPrecisionPolicy`): reversible backprop's
    gradients against autograd's under the same sharding, as a relative norm over all parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    _join(rank, port)
    torch.set_num_threads(1)
    errors = {}
    for name in ("rev_vit_tiny_patch16_224", "rev_mvit_tiny"):
        grads = {}
        for mode in ("autograd", "reversible"):
            torch.manual_seed(0)
            model = small(name, num_classes=5, drop_path_rate=0.0).train().set_backprop(mode)
            shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
            x = example_input(model, batch=4)[2 * rank:2 * rank + 2]
            model(x).float().square().mean().backward()
            grads[mode] = [local_value(p.grad) for p in model.parameters()]
        diff = sum((r.double() - a.double()).square().sum() for r, a in zip(grads["reversible"], grads["autograd"]))
        total = sum(a.double().square().sum() for a in grads["autograd"])
        errors[name] = (diff / total).sqrt().item()
        errors[f"{name}/dtypes"] = sorted({str(g.dtype) for g in grads["reversible"]})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(errors, f)
    dist.destroy_process_group()


def test_fsdp2_with_bf16_mixed_precision_gives_autograds_gradients_to_bf16_accuracy(tmp_path):
    """Measured 0.0009 (Rev-ViT) and 0.004 (Rev-MViT): the rounding of bf16 compute, not a wrong gradient
    (which would be of order 1)."""
    spawn_two(_mixed_precision_errors, str(tmp_path / "errors.json"))
    errors = json.loads((tmp_path / "errors.json").read_text())
    for name in ("rev_vit_tiny_patch16_224", "rev_mvit_tiny"):
        assert errors[name] < 2e-2, errors
        assert errors[f"{name}/dtypes"] == ["torch.float32"]  # the sharded gradients keep the parameters' dtype


def _compiled_errors(rank: int, port: int, name: str, out: str) -> None:
    """`shard_model` then `compile_blocks` (aot_eager): the sharded, compiled model's gradients against an
    unsharded eager copy, at the finest split (F's head groups through the compiled `forward_part`)."""
    from revvit.reversible import compile_blocks

    _join(rank, port)
    torch.set_num_threads(1)
    torch._dynamo.reset()
    reference = small(name, num_classes=5, drop_path_rate=0.2).double().train().set_chunking(1)
    model = compile_blocks(shard_model(copy.deepcopy(reference)), backend="aot_eager")
    x = example_input(reference, batch=4).double()[2 * rank:2 * rank + 2]
    for m in (reference, model):
        torch.manual_seed(5 + rank)
        weighted_sum(m(x)).backward()
    worst = 0.0
    for p, q in zip(reference.parameters(), model.parameters()):
        dist.all_reduce(p.grad)
        expected = p.grad / 2
        worst = max(worst, (local_value(q.grad) - expected).norm().item() / max(expected.norm().item(), 1e-3))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"worst": worst}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["rev_vit_tiny_patch16_224", pytest.param("rev_mvit_tiny", marks=pytest.mark.slow)])
def test_fsdp2_with_compiled_blocks_gives_the_unsharded_eager_gradients(tmp_path, name):
    spawn_two(_compiled_errors, name, str(tmp_path / "errors.json"))
    assert json.loads((tmp_path / "errors.json").read_text())["worst"] < 1e-10


def _train(rank: int, port: int, overrides: list, out: str) -> None:
    torchrun_env(rank, port)
    fit(tiny(*overrides), out, resume=os.path.isdir(out))


def test_train_fsdp_on_two_processes_matches_one_process(tmp_path):
    # Deterministic training, as the DDP test in test_train.py: the two ranks' halves of each global batch
    # make up the one-process batch, and the sharded gradients are averaged over the ranks.
    common = ["epochs=1", "batch_size=16", "steps_per_epoch=3", "lr=0.01", "clip_grad=1.0", "device=cpu"]
    fit(tiny(*common), tmp_path / "one")
    spawn_two(_train, [*common, "parallel=fsdp"], str(tmp_path / "two"))
    one, two = load_file(tmp_path / "one" / ckpt.WEIGHTS), load_file(tmp_path / "two" / ckpt.WEIGHTS)
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert a["val_top1"] == pytest.approx(b["val_top1"])  # evaluation in lockstep counts every sample once


def test_an_fsdp_checkpoint_resumes_in_one_unsharded_process(tmp_path):
    # The checkpoint holds the full model and an optimiser state keyed by parameter name: the fsdp run's
    # epoch-1 checkpoint, resumed in one process, ends where one process ends.
    common = ["epochs=2", "batch_size=16", "steps_per_epoch=2", "lr=0.01", "device=cpu"]
    fit(tiny(*common), tmp_path / "one")
    spawn_two(_train, [*common, "parallel=fsdp"], str(tmp_path / "two"))
    saved = torch.load(tmp_path / "two" / "ckpt_00000002.pt", weights_only=True)
    assert all(isinstance(k, str) for k in saved["optimizer"]["state"])
    (tmp_path / "two" / "ckpt_00000004.pt").unlink()  # back to the end of epoch 1
    fit(tiny(*common), tmp_path / "two", resume=True)
    one, two = load_file(tmp_path / "one" / ckpt.WEIGHTS), load_file(tmp_path / "two" / ckpt.WEIGHTS)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_one_process_checkpoint_resumes_sharded(tmp_path):
    common = ["epochs=2", "batch_size=16", "steps_per_epoch=2", "lr=0.01", "device=cpu"]
    fit(tiny(*common), tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    (tmp_path / "two" / "ckpt_00000004.pt").unlink()
    spawn_two(_train, [*common, "parallel=fsdp"], str(tmp_path / "two"))
    one, two = load_file(tmp_path / "one" / ckpt.WEIGHTS), load_file(tmp_path / "two" / ckpt.WEIGHTS)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_refuses_ema_with_a_clear_error(tmp_path):
    spawn_two(_refused, ["epochs=1", "device=cpu", "parallel=fsdp", "ema=true"], str(tmp_path / "run"))
    assert "parallel=fsdp does not support ema" in (tmp_path / "run.error").read_text()
    assert not (tmp_path / "run").exists()


def _refused(rank: int, port: int, overrides: list, out: str) -> None:
    try:
        _train(rank, port, overrides, out)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        if rank == 0:
            with open(out + ".error", "w") as f:
                f.write(str(e))


def _lockstep_with_an_empty_rank(rank: int, port: int, out: str) -> None:
    from revvit.train.evaluate import _in_lockstep

    _join(rank, port)
    loader = [(torch.zeros(1), torch.zeros(1))] * (3 if rank == 0 else 0)
    try:
        list(_in_lockstep(loader, torch.device("cpu")))
        said = "no error"
    except Exception as e:  # noqa: BLE001 - the test reads the message
        said = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(said)
    dist.destroy_process_group()


def test_lockstep_evaluation_stops_every_rank_when_one_has_no_batch(tmp_path):
    spawn_two(_lockstep_with_an_empty_rank, str(tmp_path / "said"))
    for rank in (0, 1):
        assert "no validation batch" in (tmp_path / f"said.{rank}").read_text()
