"""Chunked recomputation: F and G rebuilt and back-propagated in pieces give the gradients of the whole,
hold less memory, and parameter gradients reach `.grad` (or autograd.grad) as before. Most of these are
about F and G recomputed under autograd (`fused=False`); fused couplings in pieces: tests/test_fused.py."""
import copy

import pytest
import timm
import torch
from torch.nn.utils.parametrizations import spectral_norm

from helpers import assert_reversible_matches_autograd, weighted_sum
from revvit.bench import measure_training_memory
from revvit.layers.attention import AttentionBranch
from revvit.layers.mlp import MlpBranch
from revvit.reversible import ReversibleBlock, ReversibleStack
from revvit.reversible import pieces as chunks
from revvit.reversible.engine import _Tape
from test_models import NAMES, example_input, small


def vit_stack(depth: int, dim: int = 16, heads: int = 4, drop_path: float = 0.3, dtype=torch.float64):
    torch.manual_seed(0)
    blocks = [ReversibleBlock(AttentionBranch(dim, heads, qkv_bias=True), MlpBranch(dim, 2.0), drop_path)
              for _ in range(depth)]
    return ReversibleStack(blocks).to(dtype)


def two_stream_loss(out):
    y1, y2 = out
    return weighted_sum(y1) + y2.square().sum()


@pytest.fixture
def count_pieces(monkeypatch):
    """The pieces the engine splits F and G into, fused or recomputed, one list per call (more than one
    piece: it chunked)."""
    seen = []

    def spy_on(name: str) -> None:
        original = getattr(chunks, name)

        def spy(fn, b, chunk_bytes, forward=False):
            seen.append(original(fn, b, chunk_bytes, forward))
            return seen[-1]

        monkeypatch.setattr(chunks, name, spy)

    spy_on("pieces")
    spy_on("fused_pieces")
    return seen


@pytest.mark.parametrize("chunk_bytes", [1, 2000, 15000])  # finest (tokens, samples), coarser, 3 slices of the batch
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_fp64_chunked_gradients_equal_autograd_with_drop_path(depth, chunk_bytes, count_pieces):
    stack = vit_stack(depth)
    stack.set_chunking(chunk_bytes, fused=False)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert max(map(len, count_pieces)) > 1


@pytest.mark.parametrize("budget", [1, 7])  # finest (7 tokens, 4 heads); 2 token slices, 2 groups of heads
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_fp64_one_sample_in_token_slices_and_groups_of_heads_equals_autograd(depth, budget, count_pieces):
    stack = vit_stack(depth)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    stack.set_chunking(budget * x.nbytes, fused=False)  # bytes per unit of the input: F's parts hold 3 + 8 / n
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss)
    parts = {len(p) for p in count_pieces if isinstance(p[0], chunks.Part)}
    assert parts == ({4} if budget == 1 else {2})


@pytest.mark.parametrize("depth", [2, 3])
def test_fp32_chunked_gradients_equal_autograd(depth, count_pieces):
    stack = vit_stack(depth, dtype=torch.float32)
    stack.set_chunking(1, fused=False)  # as many pieces as tokens (G) and samples (F: fewer than its heads' parts)
    x = torch.randn(3, 7, 16)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert max(map(len, count_pieces)) == 7


def test_small_inputs_are_not_split_by_default(count_pieces):
    stack = vit_stack(2)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    sum(stack(x, x)).sum().backward()
    assert count_pieces and {len(p) for p in count_pieces} == {1}


@pytest.mark.parametrize("fused", [True, False])
def test_chunking_off_never_splits(fused, monkeypatch):
    stack = vit_stack(2)
    stack.set_chunking(0, fused=fused)
    seen, original = [], _Tape.pieces
    monkeypatch.setattr(_Tape, "pieces", lambda tape, *a, **k: seen.append(original(tape, *a, **k)) or seen[-1])
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    sum(stack(x, x)).sum().backward()
    assert len(seen) == 8 and all(p == [None] for p in seen)  # 4 couplings, forward and backward


def test_a_random_function_is_never_split(monkeypatch):
    stack = vit_stack(2)
    stack.set_chunking(1, fused=False)
    stack.blocks[0].g.mlp.drop = torch.nn.Dropout(0.2)  # G of block 0 draws random numbers now
    split = set()
    original = chunks.pieces
    monkeypatch.setattr(chunks, "pieces",
                        lambda fn, b, c, forward=False: split.add(id(fn)) or original(fn, b, c, forward))
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    sum(stack(x, x)).sum().backward()
    assert id(stack.blocks[0].g) not in split and id(stack.blocks[1].g) in split


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1MB"])
def test_a_bad_chunk_size_is_refused(bad):
    with pytest.raises(ValueError, match="chunk_bytes"):
        vit_stack(1).set_chunking(bad)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "recomputed"])
@pytest.mark.parametrize("batch", [2, 1])  # single samples; one sample: token slices and groups of heads
@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(small(n), "set_chunking")])
def test_every_reversible_model_is_exact_when_chunked(name, batch, fused, count_pieces):
    model = small(name, num_classes=5, drop_path_rate=0.3).set_chunking(1, fused).double()  # fp64: rtol 1e-10
    assert_reversible_matches_autograd(model, example_input(model, batch).double(),
                                       loss=lambda out: out.logsumexp(-1).sum(), seed=4)
    split = max(map(len, count_pieces)) > 1
    assert split != (batch == 1 and fused and name.startswith("rev_vit"))  # fused: never finer than a sample
    if batch == 1 and not fused:
        assert any(isinstance(p[0], chunks.Part) for p in count_pieces)


def test_chunking_lowers_the_peak_and_keeps_it_flat_in_depth():
    x = torch.randn(2, 3, 64, 64)

    def mb(depth: int, chunk_bytes) -> float:
        torch.manual_seed(0)
        model = timm.create_model("rev_vit_tiny_patch16_224", img_size=64, patch_size=8, depth=depth, num_classes=10,
                                  drop_path_rate=0.0)
        return measure_training_memory(model.set_chunking(chunk_bytes, fused=False), x).mb_per_sample

    whole, chunked = mb(4, 0), mb(4, 1)
    assert chunked < 0.8 * whole
    assert mb(8, 1) == pytest.approx(chunked, rel=0.01)


def test_parameter_gradients_accumulate_into_existing_grads():
    stack = vit_stack(2, drop_path=0.0)  # the same function twice
    stack.set_chunking(1)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    two_stream_loss(stack(x, x)).backward()
    once = [p.grad.clone() for p in stack.parameters()]
    two_stream_loss(stack(x, x)).backward()
    for p, g in zip(stack.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)


def test_autograd_grad_returns_parameter_gradients_and_leaves_grad_untouched():
    stack = vit_stack(2, drop_path=0.0)
    stack.set_chunking(1)
    params = list(stack.parameters())
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(two_stream_loss(stack(x, x)), params)
    assert all(p.grad is None for p in params)
    two_stream_loss(stack(x, x)).backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad)


def test_backward_with_inputs_fills_only_the_named_parameters():
    stack = vit_stack(2)
    named = [stack.blocks[0].g.mlp.fc1.weight, stack.blocks[1].f.attn.q.weight]
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    two_stream_loss(stack(x, x)).backward(inputs=named)
    assert all(p.grad is not None for p in named)
    assert all(p.grad is None for p in stack.parameters() if all(p is not q for q in named))


class Concatenated(torch.nn.Module):
    def __init__(self, stack: ReversibleStack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return torch.cat(self.stack(x, x), -1)


def test_recomputed_linear_layers_add_weight_gradients_into_grad_without_a_weight_sized_temporary(monkeypatch):
    # batch 1 and a few tokens: the MLP's weights (64 x 1024 floats = 256 KiB each) outweigh its activations
    torch.manual_seed(0)
    stack = ReversibleStack([ReversibleBlock(MlpBranch(64, 16.0), MlpBranch(64, 16.0)) for _ in range(2)])
    stack.set_chunking(None, fused=False)  # recomputed under autograd: through layers/linear.py
    model = Concatenated(stack)
    x = torch.randn(1, 4, 64)
    into_grad = measure_training_memory(model, x, loss_fn=lambda out, _: weighted_sum(out))
    import revvit.layers.linear as linear
    monkeypatch.setattr(linear, "gradient_buffer", lambda t: None)  # the ordinary path: autograd adds a new tensor
    ordinary = measure_training_memory(model, x, loss_fn=lambda out, _: weighted_sum(out))
    assert into_grad.peak_bytes <= ordinary.peak_bytes - 64 * 1024 * 4


def test_rev_vit_small_peak_with_4_mib_pieces_is_under_the_2_5_mb_per_image_target():
    """What is alive at the peak, in units of one (B, N, D) stream: the kept input, Y1, Y2, dY1 and dY2 (the
    block backward updates them in place, the head's norm writes them without a concatenation), plus one
    piece of F: its LayerNorm's output and one group of heads. Measured 8.69 (2.49 MB per image at
    batch 4; the target of 2.5 MB is 8.71 units; before `norm_streams` the head made it 9.04)."""
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_small_patch16_224", depth=3, drop_path_rate=0.0)
    model.set_chunking(4 * 2 ** 20, fused=False)
    x = torch.randn(4, 3, 224, 224)
    unit = x.shape[0] * model.patch_embed.num_patches * model.embed_dim * 4
    peak = measure_training_memory(model, x).peak_bytes
    assert 5 * unit < peak <= 8.71 * unit


def _flops(model, x, mode: str, backward: bool = True) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.set_backprop(mode)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def test_flop_counter_counts_a_rev_vit_step_as_autograd_plus_one_forward_of_the_blocks():
    """The weight gradients added into `.grad` in place (`addmm_`) are counted like autograd's `mm`s, so the
    difference is exactly the recomputation: one forward of the blocks' F and G."""
    from torch.utils.flop_counter import FlopCounterMode

    model = small("rev_vit_tiny_patch16_224", num_classes=5)
    x = example_input(model)
    with torch.no_grad():
        tokens, _ = model._embed(x)
        with FlopCounterMode(display=False) as counter:
            model.stack(tokens, tokens)
    blocks = counter.get_total_flops()
    assert blocks > 0
    assert _flops(model, x, "reversible") == _flops(model, x, "autograd") + blocks


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["default", "finest"])
@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(small(n), "set_chunking")])
def test_flop_counter_counts_more_for_a_reversible_step_than_for_autograd(name, chunk_bytes):
    """Also when the forward runs in pieces (a slice of the block's input has no gradient function of its own,
    which the counter's module tracker could not hook)."""
    model = small(name, num_classes=5)
    model.set_chunking(chunk_bytes)
    x = example_input(model)
    forward = _flops(model, x, "autograd", backward=False)
    assert _flops(model, x, "autograd") + forward // 2 < _flops(model, x, "reversible")


def halves(total: int) -> list:
    return [(slice(0, total // 2),), (slice(total // 2, total),)]


def test_automatic_split_is_two_halves_of_the_batch():
    g, f = MlpBranch(64, 4.0), AttentionBranch(64, 4, qkv_bias=True)
    large = torch.empty(4, 1200, 64)  # a recomputation of ~16 x 1.2 MB: above the 8 MiB threshold
    assert chunks.pieces(g, large, None) == chunks.pieces(f, large, None) == halves(4)
    small = torch.empty(2, 8, 64)  # splitting would only cost time
    assert chunks.pieces(g, small, None) == chunks.pieces(f, small, None) == [None]


def test_one_sample_is_split_into_three_token_slices_of_g_and_two_head_groups_of_f():
    g, f = MlpBranch(64, 4.0), AttentionBranch(64, 4, qkv_bias=True)
    one = torch.empty(1, 4800, 64)
    assert chunks.pieces(g, one, None) == [(slice(None), slice(lo, lo + 1600)) for lo in (0, 1600, 3200)]
    assert chunks.pieces(f, one, None) == [chunks.Part(0, 2), chunks.Part(1, 2)]


@pytest.mark.parametrize("batch, n, sizes", [(64, 3, [21, 22, 21]), (4, 3, [1, 1, 1, 1]), (5, 2, [2, 1, 2]),
                                             (6, 2, [3, 3]), (2, 5, [1, 1])])
def test_slices_of_the_batch_are_near_even_and_each_within_an_eighth_of_its_share(batch, n, sizes):
    b = torch.empty(batch, 10, 8)
    got = chunks.pieces(AttentionBranch(8, 2, qkv_bias=True), b, -(-chunks.PIECE_UNITS * b.nbytes // n))
    if batch < n:  # the batch cannot make n pieces: F's heads are finer (2 groups here) or the batch is
        assert got == [(slice(0, 1),), (slice(1, 2),)]
        return
    assert [s[0].stop - s[0].start for s in got] == sizes
    assert got[0][0].start == 0 and got[-1][0].stop == batch


def test_a_budget_takes_the_batch_when_it_makes_enough_pieces_and_else_the_finer_way():
    g, f = MlpBranch(64, 4.0), AttentionBranch(64, 4, qkv_bias=True)
    b = torch.empty(4, 12, 64)
    need = chunks.PIECE_UNITS * b.nbytes
    assert len(chunks.pieces(g, b, need // 4)) == 4 and chunks.is_slice(chunks.pieces(g, b, need // 4)[0])
    assert chunks.pieces(g, b, need // 4)[0] == (slice(0, 1),)  # samples
    assert chunks.pieces(g, b, need // 6)[0] == (slice(None), slice(0, 2))  # 6 > 4 samples: tokens
    assert chunks.pieces(f, b, need // 6) == [(slice(k, k + 1),) for k in range(4)]  # 4 heads: no finer


def test_a_sum_of_parts_is_taken_only_where_it_holds_less_than_single_samples():
    """A summand holds the whole input's LayerNorm output, its full-width output and input gradient
    (`PART_UNITS`) whatever the number of parts: with a few samples and many heads it is finer, with many
    samples it is not."""
    b4, b2, one = torch.empty(4, 12, 64), torch.empty(2, 12, 64), torch.empty(1, 12, 64)
    f8, f16 = AttentionBranch(64, 8, qkv_bias=True), AttentionBranch(64, 16, qkv_bias=True)
    singles = [(slice(k, k + 1),) for k in range(4)]
    assert chunks.pieces(f8, b4, chunks.PIECE_UNITS * b4.nbytes // 6) == singles  # 8 heads: 3 + 8/8 > 8/4
    assert chunks.pieces(f16, b2, 1) == [chunks.Part(k, 16) for k in range(16)]  # 3 + 8/16 < 8/2
    budget = (chunks.PART_UNITS + 2) * one.nbytes  # parts of 4 heads fit (3 + 8/4), a whole F does not (8)
    assert chunks.pieces(f16, one, budget) == [chunks.Part(k, 4) for k in range(4)]


def test_only_a_declared_per_sample_function_is_split_over_the_batch():
    class PerSample(torch.nn.Linear):
        per_sample = True

    b = torch.empty(4, 12, 64)
    assert chunks.pieces(PerSample(64, 64), b, 1) == [(slice(k, k + 1),) for k in range(4)]
    assert chunks.pieces(torch.nn.Linear(64, 64), b, 1) == [None]  # might use batch statistics: whole


def test_the_automatic_split_halves_the_forward_too_but_never_splits_one_sample():
    g, f = MlpBranch(64, 4.0), AttentionBranch(64, 4, qkv_bias=True)
    large = torch.empty(4, 1200, 64)
    assert chunks.pieces(g, large, None, forward=True) == chunks.pieces(f, large, None, forward=True) == halves(4)
    one = torch.empty(1, 4800, 64)  # token slices or head groups would change how the forward rounds
    assert chunks.pieces(g, one, None, forward=True) == chunks.pieces(f, one, None, forward=True) == [None]
    budget = 2 * large.nbytes  # 8 units in pieces of 2: 4 pieces, forward and backward
    singles = [(slice(k, k + 1),) for k in range(4)]
    assert chunks.pieces(g, large, budget, forward=True) == chunks.pieces(g, large, budget) == singles


def test_the_automatic_split_of_a_recomputation_holds_rev_vit_small_under_2_5_mb_per_image(monkeypatch):
    """Rev-ViT-S at batch 4 recomputed (not fused) in halves of the batch: the forward holds the kept input,
    the block's two input streams, its new Y1 and a half batch's LayerNorm output, hidden layer and G output
    (8.0 units of one (B, N, D) stream); the backward the four streams Y1, Y2, dY1, dY2, the kept input and a
    half batch's LayerNorm output, H (or q, k, v) and one block's gradients (8.5). Measured 2.44 MB per image. With a
    whole forward the peak would be the forward's (10 units)."""
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_small_patch16_224", depth=3, drop_path_rate=0.0).set_chunking(fused=False)
    x = torch.randn(4, 3, 224, 224)
    unit = x.shape[0] * model.patch_embed.num_patches * model.embed_dim * 4
    split = measure_training_memory(model, x).peak_bytes
    assert split <= 8.6 * unit and split / x.shape[0] / 2 ** 20 <= 2.5
    original = chunks.pieces
    monkeypatch.setattr(chunks, "pieces", lambda fn, b, c, forward=False: [None] if forward else original(fn, b, c))
    assert measure_training_memory(model, x).peak_bytes > 9.5 * unit


@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(small(n), "set_chunking")])
def test_every_reversible_model_is_exact_when_split_into_halves_of_its_batch(name, monkeypatch, count_pieces):
    monkeypatch.setattr(chunks, "AUTO_MIN_BYTES", 0)  # the automatic split, even for these small inputs
    model = small(name, num_classes=5, drop_path_rate=0.3).set_chunking(fused=False).double()
    assert_reversible_matches_autograd(model, example_input(model).double(),
                                       loss=lambda out: out.logsumexp(-1).sum(), seed=4)
    assert halves(2) in count_pieces


@pytest.mark.parametrize("chunk_bytes, fused", [(None, True), (0, False), (4 * 2 ** 20, False), (5 * 2 ** 20, False)])
def test_drop_path_adds_almost_nothing_to_the_peak(chunk_bytes, fused):
    """The masked output DropPath(fn(b)) is never made whole: the forward and the rebuild add and subtract
    it a few tokens at a time, and the backward starts from the mask's gradient. What remains is the
    masked gradient, alive until fn's last layer has used it (a piece's share of a stream, or one stream
    for a head group). Before, a 4 MiB split peaked 0.66 units higher with drop path."""
    x = torch.randn(4, 3, 224, 224)

    def peak(rate: float) -> int:
        torch.manual_seed(0)
        model = timm.create_model("rev_vit_small_patch16_224", depth=2, drop_path_rate=rate)
        return measure_training_memory(model.set_chunking(chunk_bytes, fused), x).peak_bytes

    unit = x.shape[0] * 196 * 384 * 4
    assert peak(0.5) <= peak(0.0) + 0.2 * unit


def test_rev_vit_small_recomputed_in_single_images_holds_under_2_05_mb_per_image():
    """4 MiB pieces of Rev-ViT-S at batch 4 recomputed (not fused) are single images, forward (8 x 1.2 MB /
    4 MiB -> 3, so 4 near-even slices) and backward. The forward is the peak: the kept input, the block's two
    input streams, its new Y1 and one image's LayerNorm output, hidden layer and G output. Measured 7.0 units
    (2.01 MB per image)."""
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_small_patch16_224", depth=3, drop_path_rate=0.0)
    model.set_chunking(4 * 2 ** 20, fused=False)
    x = torch.randn(4, 3, 224, 224)
    unit = x.shape[0] * model.patch_embed.num_patches * model.embed_dim * 4
    assert measure_training_memory(model, x).peak_bytes <= 7.1 * unit


def test_a_function_whose_forward_changes_its_buffers_runs_whole_and_replays_them(count_pieces):
    # spectral norm on G's first layer: per token in its maths, but each call takes a power-iteration step
    # (its buffers u, v change), so G runs whole and its recomputation starts from the forward's u, v
    stack = vit_stack(3)
    for block in stack.blocks:
        spectral_norm(block.g.mlp.fc1)
    stack.set_chunking(1)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    grads, buffers = {}, {}
    for mode in ("reversible", "autograd"):
        s = copy.deepcopy(stack)  # the same u, v to start from
        s.set_backprop(mode)
        v = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        two_stream_loss(s(v, v)).backward()
        grads[mode] = torch.cat([v.grad.flatten()] + [p.grad.flatten() for p in s.parameters()])
        buffers[mode] = [b.clone() for b in s.buffers()]
    assert (grads["reversible"] - grads["autograd"]).norm() < 1e-10 * grads["autograd"].norm()
    assert all(torch.equal(a, b) for a, b in zip(buffers["reversible"], buffers["autograd"]))  # one step each
    assert max(map(len, count_pieces)) > 1  # F, without buffers, is still split


class ScaledMlpBranch(MlpBranch):
    """G with a constant buffer (a fixed output scale): per token, and its forward changes no buffer."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__(dim, mlp_ratio)
        self.register_buffer("scale", torch.full((dim,), 0.5))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_function_with_constant_buffers_runs_whole_in_the_forward_and_in_pieces_when_recomputed(monkeypatch):
    calls = []
    original = chunks.pieces

    def spy(fn, b, chunk_bytes, forward=False):
        calls.append((type(fn).__name__, forward, len(original(fn, b, chunk_bytes, forward))))
        return original(fn, b, chunk_bytes, forward)

    monkeypatch.setattr(chunks, "pieces", spy)
    torch.manual_seed(0)
    stack = ReversibleStack([ReversibleBlock(AttentionBranch(16, 4, qkv_bias=True), ScaledMlpBranch(16, 2.0), 0.3)
                             for _ in range(3)]).double()
    stack.set_chunking(1, fused=False)
    assert_reversible_matches_autograd(stack, torch.randn(3, 5, 16, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    g_calls = [(forward, n) for name, forward, n in calls if name == "ScaledMlpBranch"]
    assert g_calls and all(not forward and n > 1 for forward, n in g_calls)  # asked only when recomputed: split
    assert any(name == "AttentionBranch" and forward and n > 1 for name, forward, n in calls)
