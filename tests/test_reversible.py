"""The reversible engine: gradients equal plain autograd, randomness replays, memory stays flat in depth."""
import copy
from functools import partial

import pytest
import torch
from torch import nn

from helpers import assert_reversible_matches_autograd, weighted_sum
from revvit.bench import StorageMeter, measure_training_memory
from revvit.reversible import ReversibleBlock, ReversibleStack, join_streams


class Branch(nn.Module):
    """A residual function with its own randomness (dropout), like F and G of a real model."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(torch.tanh(self.fc(self.norm(x))))


def make_stack(depth: int, dim: int = 8, drop_path: float = 0.3, dtype=torch.float64) -> ReversibleStack:
    torch.manual_seed(0)
    stack = ReversibleStack([ReversibleBlock(Branch(dim), Branch(dim), drop_path) for _ in range(depth)])
    return stack.to(dtype)


def run(stack: ReversibleStack, x: torch.Tensor, mode: str, seed: int = 1, autocast=None):
    """Loss gradient w.r.t. the input and every parameter, with the global generator seeded.

    With `autocast` (a dtype) the forward runs under CPU autocast and the backward outside it, as in
    ordinary mixed-precision training.
    """
    stack.set_backprop(mode)
    stack.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y1, y2 = stack(x, x)
        loss = (y1 * torch.linspace(-1, 1, y1.shape[-1], dtype=y1.dtype)).sum() + y2.square().sum()
    loss.backward()
    return [x.grad] + [p.grad for p in stack.parameters()]


def rel_error(got: list, want: list) -> float:
    """||got - want|| / ||want|| over all gradients at once (some true gradients are exactly zero)."""
    diff = torch.cat([(g - w).flatten() for g, w in zip(got, want)])
    ref = torch.cat([w.flatten() for w in want])
    return (diff.norm() / ref.norm()).item()


MODES = ["reversible", "parallel"]  # every memory-saving backprop mode, each checked against "autograd"


def two_stream_loss(out):
    y1, y2 = out
    return weighted_sum(y1) + y2.square().sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7])
def test_fp64_gradients_equal_autograd_with_drop_path_and_dropout(depth, mode):
    stack = make_stack(depth)
    x = torch.randn(4, 5, 8, dtype=torch.float64)  # rtol 1e-10 for every gradient (helpers.RTOL)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("depth", [1, 2, 3, 7])
def test_fp32_gradients_equal_autograd(depth, mode):
    stack = make_stack(depth, dtype=torch.float32)
    x = torch.randn(4, 5, 8)  # rtol 1e-5
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss, mode=mode)


def test_parallel_mode_runs_the_reversible_schedule_bit_for_bit_on_cpu():
    stack = make_stack(5)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    got, want = run(stack, x, "parallel"), run(stack, x, "reversible")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_drop_path_actually_drops_samples_in_training():
    stack = make_stack(1, drop_path=0.5)
    stack.blocks[0].f.drop.p = stack.blocks[0].g.drop.p = 0.0
    x = torch.randn(64, 3, 8, dtype=torch.float64)
    torch.manual_seed(0)
    y1, _ = stack(x, x)
    unchanged = (y1 == x).flatten(1).all(dim=1)
    assert 10 < unchanged.sum() < 54  # about half of the samples skip F


def test_backward_leaves_global_generator_untouched():
    stack = make_stack(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    run(stack, x, "reversible", seed=7)
    after_reversible = torch.rand(3)
    run(stack, x, "autograd", seed=7)
    after_autograd = torch.rand(3)
    assert torch.equal(after_reversible, after_autograd)


def test_run_is_reproducible_from_manual_seed():
    stack = make_stack(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    first, second = run(stack, x, "reversible", seed=3), run(stack, x, "reversible", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def two_forwards_one_backward(stack, a, b, mode):
    stack.set_backprop(mode)
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ya1, ya2 = stack(a, a)
    yb1, yb2 = stack(b, b)  # draws different masks and dropout than the first forward
    (ya1.sum() + ya2.square().sum() + 2 * yb1.sum() + yb2.square().sum()).backward()
    return [p.grad for p in stack.parameters()]


@pytest.mark.parametrize("mode", MODES)
def test_two_forwards_then_one_backward_give_exact_gradients(mode):
    stack = make_stack(4)
    a, b = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    got = two_forwards_one_backward(stack, a, b, mode)
    want = two_forwards_one_backward(stack, a, b, "autograd")
    assert rel_error(got, want) < 1e-10


def test_autograd_grad_reaches_block_parameters():
    stack = make_stack(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    params = list(stack.parameters())
    torch.manual_seed(1)
    y1, y2 = stack(x, x)
    got = torch.autograd.grad((y1 + y2).square().sum(), params)
    stack.set_backprop("autograd")
    torch.manual_seed(1)
    y1, y2 = stack(x, x)
    want = torch.autograd.grad((y1 + y2).square().sum(), params)
    assert rel_error(list(got), list(want)) < 1e-10


def test_frozen_stem_still_trains_the_blocks():
    stack = make_stack(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)  # requires_grad is False: nothing before the stack trains
    torch.manual_seed(1)
    y1, y2 = stack(x, x)
    (y1.sum() + y2.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_gradients_match_autograd_under_the_same_autocast(mode):
    stack = make_stack(3, dim=32, dtype=torch.float32)
    x = torch.randn(4, 6, 32)
    got = run(stack, x, mode, autocast=torch.bfloat16)
    want = run(stack, x, "autograd", autocast=torch.bfloat16)
    assert rel_error(got, want) < 1e-3  # the recomputation repeats the forward's bf16 rounding
    fp32 = run(stack, x, "autograd")
    assert rel_error(want, fp32) > 1e-3  # so the comparison is really made in bf16


@pytest.mark.parametrize("mode", MODES)
def test_a_bf16_input_under_autocast_is_carried_and_inverted_in_the_parameters_precision(mode):
    # e.g. a Rev-MViT stage transition's bf16 output entering the next reversible run
    stack = make_stack(4, dim=32, dtype=torch.float32)
    x = torch.randn(4, 6, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = stack(x, x)
    assert y1.dtype == y2.dtype == torch.float32
    got = run(stack, x, mode, autocast=torch.bfloat16)
    want = run(stack, x, "autograd", autocast=torch.bfloat16)
    assert rel_error(got, want) < 1e-5  # streams inverted in bf16 would be off by ~1e-2


def test_no_grad_forward_is_plain_and_keeps_nothing():
    stack = make_stack(4)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    peaks = {}
    for mode in ("reversible", "autograd"):
        stack.set_backprop(mode)
        with torch.no_grad(), StorageMeter() as meter:
            y1, _ = stack(x, x)
        assert y1.grad_fn is None
        peaks[mode] = meter.peak_bytes
    assert peaks["reversible"] == peaks["autograd"]


def test_eval_mode_outputs_match_between_modes():
    stack = make_stack(3).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    outs = {}
    for mode in ("reversible", "autograd"):
        stack.set_backprop(mode)
        outs[mode] = torch.cat(stack(x, x))
    assert torch.equal(outs["reversible"], outs["autograd"])


class Stacked(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        torch.manual_seed(0)
        self.stack = ReversibleStack([ReversibleBlock(Branch(64, 0.0), Branch(64, 0.0), 0.1) for _ in range(depth)])

    def forward(self, x):
        y1, y2 = self.stack(x, x)
        return y1 + y2


def test_activation_memory_does_not_grow_with_depth():
    x = torch.randn(8, 32, 64)
    peak = {}
    for depth in (2, 8):
        for mode in ("reversible", "parallel", "autograd"):
            model = Stacked(depth)
            model.stack.set_backprop(mode)
            peak[depth, mode] = measure_training_memory(model, x).peak_bytes
    assert peak[8, "reversible"] <= peak[2, "reversible"] * 1.05
    assert peak[8, "parallel"] <= peak[2, "parallel"] * 1.05
    assert peak[8, "autograd"] > peak[2, "autograd"] * 2.5


def test_unknown_backprop_mode_is_rejected():
    with pytest.raises(ValueError, match="reversible"):
        make_stack(1).set_backprop("checkpoint")


def test_second_backward_through_the_same_graph_says_what_to_do():
    stack = make_stack(2)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y1, y2 = stack(x, x)
    loss = (y1 + y2).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="set_backprop\\('autograd'\\)"):
        loss.backward()


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_that_reaches_no_loss_still_gives_exact_gradients(mode):
    stack = make_stack(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    grads = {}
    for m in (mode, "autograd"):
        stack.set_backprop(m)
        stack.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        y1, _ = stack(x, x)  # the last G's output is unused: its backward never runs
        y1.square().sum().backward()
        grads[m] = [p.grad for p in stack.parameters()]
    saving = mode
    assert [g is None for g in grads[saving]] == [g is None for g in grads["autograd"]]
    assert any(g is None for g in grads["autograd"])  # the last G really got no gradient
    used = [(r, a) for r, a in zip(grads[saving], grads["autograd"]) if a is not None]
    assert rel_error([r for r, _ in used], [a for _, a in used]) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_parameters_shared_by_f_and_g_get_the_sum_of_both_gradients(mode):
    torch.manual_seed(0)
    shared = Branch(8).double()
    stack = ReversibleStack([ReversibleBlock(shared, shared, 0.2), ReversibleBlock(Branch(8), shared, 0.2)]).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert rel_error(run(stack, x, mode), run(stack, x, "autograd")) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_flop_counter_counts_a_reversible_step_as_autograd_plus_one_forward(mode):
    from torch.utils.flop_counter import FlopCounterMode

    stack = make_stack(3, dtype=torch.float32)
    x = torch.randn(4, 5, 8, requires_grad=True)

    def flops(m: str, backward: bool = True) -> int:
        stack.set_backprop(m)
        with FlopCounterMode(display=False) as counter:
            y1, y2 = stack(x, x)
            if backward:
                (y1 + y2).sum().backward()
        return counter.get_total_flops()

    forward = flops("autograd", backward=False)
    assert forward > 0 and flops(mode) == flops("autograd") + forward


HEADS = {
    "own buffers": lambda y1, y2: join_streams(y1, y2).sin().sum(),
    "halves of one buffer": lambda y1, y2: torch.cat([y1, y2], -1).sin().sum(),
    "one buffer for both": lambda y1, y2: (y1 + y2).sin().sum(),
    "a stream unused": lambda y1, y2: y2.sin().sum(),
}


def keep(store: list, grad) -> None:
    if grad is not None:  # (an output that reached no loss)
        store.append((grad, grad.clone()))  # the tensor the hook was given, and its value then


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_a_hook_keeps_are_not_changed_by_the_backward(mode, head):
    """The backward turns the gradients it is handed into its input gradients in place, but never ones
    someone else holds: a hook on the stack's output that keeps its gradient finds it unchanged."""
    stack = make_stack(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for m in (mode, "autograd"):
        stack.set_backprop(m)
        stack.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(2)
        y1, y2 = stack(x, x)
        kept: list = []
        for y in (y1, y2):
            y.register_hook(partial(keep, kept))
        HEADS[head](y1, y2).backward()
        assert kept and all(torch.equal(g, value) for g, value in kept)
        grads[m] = [x.grad] + [p.grad for p in stack.parameters() if p.grad is not None]
    assert rel_error(grads[mode], grads["autograd"]) < 1e-10


def test_join_streams_is_a_concatenation_whose_halves_get_gradient_buffers_of_their_own():
    y1, y2 = (torch.randn(2, 3, 4, requires_grad=True) for _ in range(2))
    seen = []
    for y in (y1, y2):
        y.register_hook(seen.append)
    joined = join_streams(y1, y2)
    assert torch.equal(joined, torch.cat([y1, y2], -1))
    joined.square().sum().backward()
    assert all(g._base is None and g.is_contiguous() for g in seen)
    assert seen[0].untyped_storage().data_ptr() != seen[1].untyped_storage().data_ptr()


class ConvBranch(nn.Module):
    """A residual function with BatchNorm, as in a reversible CNN (RevNet): its running statistics change
    with every call in training."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum", [0.1, None])  # None: a cumulative average, counted by num_batches_tracked
def test_batchnorm_running_statistics_count_each_forward_once(mode, momentum):
    torch.manual_seed(0)
    stack = ReversibleStack([ReversibleBlock(ConvBranch(3), ConvBranch(3), drop_path=0.2) for _ in range(3)])
    for m in stack.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    stack = stack.double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    grads, stats = {}, {}
    for backprop in (mode, "autograd"):
        s = copy.deepcopy(stack)
        got = run(s, x, backprop)
        grads[backprop], stats[backprop] = got, [b.clone() for b in s.buffers()]
    assert rel_error(grads[mode], grads["autograd"]) < 1e-10
    assert stats["autograd"][2].item() == 1  # one forward, one batch counted
    assert all(torch.equal(a, b) for a, b in zip(stats[mode], stats["autograd"]))


def test_an_f_that_writes_over_its_input_is_refused_with_what_to_do():
    f = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 8))  # silently changes the stream it reads
    stack = ReversibleStack([ReversibleBlock(f, nn.Linear(8, 8))])
    x = torch.randn(2, 5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="changed its input in place.*out of place"):
        stack(x * 1, x * 2)


def test_torch_func_per_sample_gradients_take_the_plain_forward_and_equal_autograd_mode():
    from torch.func import functional_call, grad, vmap

    stack = make_stack(3, drop_path=0.0)
    for m in stack.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # vmap refuses random draws unless told how to batch them
    params = {k: v.detach() for k, v in stack.named_parameters()}
    x = torch.randn(4, 5, 8, dtype=torch.float64)

    def loss(p, sample):
        y1, y2 = functional_call(stack, p, (sample[None], sample[None]))
        return two_stream_loss((y1, y2))

    per_sample = {}
    for mode in ("reversible", "autograd"):
        stack.set_backprop(mode)
        per_sample[mode] = vmap(grad(loss), in_dims=(None, 0))(params, x)
    assert all(torch.allclose(per_sample["reversible"][k], per_sample["autograd"][k], rtol=1e-12) for k in params)
    assert per_sample["reversible"]["blocks.0.f.fc.weight"].shape == (4, 8, 8)


def test_a_backward_that_records_a_graph_is_refused_with_what_to_do():
    stack = make_stack(2)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    y1, y2 = stack(x, x)
    with pytest.raises(RuntimeError, match="first derivatives only.*set_backprop\\('autograd'\\)"):
        torch.autograd.grad(two_stream_loss((y1, y2)), x, create_graph=True)  # a gradient penalty
    stack.set_backprop("autograd")  # where second derivatives work
    y1, y2 = stack(x, x)
    (g,) = torch.autograd.grad(two_stream_loss((y1, y2)), x, create_graph=True)
    g.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_hooks_on_a_block_run_as_in_autograd_mode_and_see_the_same_tensors(mode):
    stack = make_stack(3, drop_path=0.0)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    seen = {}

    def keep(kind):
        return lambda module, inputs, outputs: seen.setdefault((stack.backprop, kind), []).append(
            [t.detach().clone() for t in outputs if t is not None])

    stack.blocks[1].register_forward_hook(keep("forward"))  # outputs: (Y1, Y2)
    stack.blocks[1].register_full_backward_hook(keep("backward"))  # grad outputs: (dY1, dY2)
    for backprop in (mode, "autograd"):
        run(stack, x, backprop)
    for kind in ("forward", "backward"):
        got, want = seen[(mode, kind)], seen[("autograd", kind)]
        assert len(got) == len(want) == 1, f"{kind} hook ran {len(got)} times, autograd mode: {len(want)}"
        assert all(torch.allclose(g, w, rtol=1e-12, atol=1e-14) for g, w in zip(got[0], want[0]))


@pytest.mark.parametrize("hook", ["pre-hook returns new inputs", "hook returns new outputs", "hook edits an output"])
def test_a_hook_that_changes_a_blocks_streams_is_refused_with_what_to_do(hook):
    stack = make_stack(3)
    block = stack.blocks[1]
    if hook == "pre-hook returns new inputs":
        block.register_forward_pre_hook(lambda module, args: (args[0] * 2, args[1]))
    elif hook == "hook returns new outputs":
        block.register_forward_hook(lambda module, args, out: (out[0], out[1] + 1))
    else:
        def edit(module, args, out):
            out[0].mul_(2)

        block.register_forward_hook(edit)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="hooks may read the streams but not change them.*autograd"):
        stack(x, x)
    if hook != "hook edits an output":  # (editing a tensor autograd saved fails there too)
        stack.set_backprop("autograd")  # where such hooks work
        two_stream_loss(stack(x, x)).backward()
        assert x.grad is not None
