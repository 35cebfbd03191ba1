"""Fused couplings (`set_chunking(fused=True)`, the default): Rev-ViT's attention and MLP and Rev-MViT's MLP add
themselves to their stream in the forward and, in the backward, take themselves back out while
back-propagating, a block of hidden columns or group of heads at a time (`layers/coupling.py`). They give
autograd's gradients, hold less than a recomputation under autograd, and step aside wherever their own pass
would not compute what the branch's call does."""
import pytest
import timm
import torch

from helpers import assert_reversible_matches_autograd, weighted_sum
from revvit.bench import measure_training_memory
from revvit.layers.attention import AttentionBranch
from revvit.layers.coupling import PreNormCoupling
from revvit.layers.mlp import MlpBranch
from revvit.reversible import ReversibleBlock, ReversibleStack
from revvit.reversible import pieces as chunks
from revvit.reversible.replay import parameters_swapped, stand_ins
from test_models import NAMES, example_input, small


def vit_stack(depth: int, dim: int = 24, heads: int = 6, drop_path: float = 0.3, dtype=torch.float64):
    torch.manual_seed(0)
    blocks = [ReversibleBlock(AttentionBranch(dim, heads, qkv_bias=True), MlpBranch(dim, 2.0), drop_path)
              for _ in range(depth)]
    return ReversibleStack(blocks).to(dtype)


def two_stream_loss(out):
    y1, y2 = out
    return weighted_sum(y1) + y2.square().sum()


halves = [(slice(0, 2),), (slice(2, 4),)]


@pytest.fixture
def fused_calls(monkeypatch):
    """The branches whose fused backward ran, one entry per piece."""
    calls = []
    original = PreNormCoupling.coupling_backward

    def spy(self, out, b, d, mask):
        calls.append(type(self).__name__)
        return original(self, out, b, d, mask)

    monkeypatch.setattr(PreNormCoupling, "coupling_backward", spy)
    return calls


# -- the same gradients as autograd ----------------------------------------------------------------------

@pytest.mark.parametrize("chunk_bytes", [None, 0, 1])  # whole, never split, single samples
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_fp64_fused_gradients_equal_autograd_with_drop_path(depth, chunk_bytes, fused_calls):
    stack = vit_stack(depth)
    stack.set_chunking(chunk_bytes)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert {"AttentionBranch", "MlpBranch"} <= set(fused_calls)


@pytest.mark.parametrize("depth", [2, 3])
def test_fp64_fused_in_halves_of_the_batch_equals_autograd(depth, monkeypatch, fused_calls):
    stack = vit_stack(depth)
    x = torch.randn(4, 7, 24, dtype=torch.float64)
    most = max(fn.coupling_units(False) for fn in (stack.blocks[0].f, stack.blocks[0].g))
    stack.set_chunking(int(most * x.nbytes / 2) + 1)  # each branch's backward: two slices hold it
    split, original = [], chunks.fused_pieces
    monkeypatch.setattr(chunks, "fused_pieces", lambda fn, b, c, forward=False: (
        split.append(original(fn, b, c, forward)) or split[-1]) if not forward else original(fn, b, c, forward))
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert len(split) == 2 * depth and all(pieces == halves for pieces in split)
    assert len(fused_calls) == 4 * depth


@pytest.mark.parametrize("depth", [2, 3])
def test_fp32_fused_gradients_equal_autograd(depth, fused_calls):
    stack = vit_stack(depth, dtype=torch.float32)
    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24), forward=lambda s, v: s(v, v),
                                       loss=two_stream_loss)
    assert fused_calls


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # one sample: whole, however fine the budget
def test_fp64_one_sample_fused_equals_autograd(chunk_bytes, fused_calls):
    stack = vit_stack(3)
    stack.set_chunking(chunk_bytes)
    assert_reversible_matches_autograd(stack, torch.randn(1, 7, 24, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert fused_calls.count("MlpBranch") == fused_calls.count("AttentionBranch") == 3


@pytest.mark.parametrize("name", [n for n in NAMES if hasattr(small(n), "set_chunking")])
def test_every_reversible_model_fuses_its_mlp_and_is_exact(name, fused_calls):
    model = small(name, num_classes=5, drop_path_rate=0.3).double()
    assert_reversible_matches_autograd(model, example_input(model, 3).double(),
                                       loss=lambda out: out.logsumexp(-1).sum(), seed=4)
    assert "MlpBranch" in fused_calls and ("AttentionBranch" in fused_calls) == name.startswith("rev_vit")


# -- one branch: the pass adds what its call computes and takes back out what it added -------------------

BRANCHES = {
    "mlp": lambda: MlpBranch(24, 4.0),
    "mlp tanh, ratio 1.5": lambda: _tanh(MlpBranch(24, 1.5)),
    "attention, 6 heads": lambda: AttentionBranch(24, 6, qkv_bias=True),
    "attention, 1 head, no qkv bias": lambda: AttentionBranch(24, 1, qkv_bias=False),
    "attention, 12 heads": lambda: AttentionBranch(48, 12, qkv_bias=True),
}


def _tanh(branch: MlpBranch) -> MlpBranch:
    branch.mlp.act.approximate = "tanh"
    return branch


@pytest.mark.parametrize("masked", [False, True], ids=["no drop path", "drop path"])
@pytest.mark.parametrize("make", BRANCHES.values(), ids=BRANCHES.keys())
def test_a_branchs_fused_pass_equals_its_call_and_autograds_gradients(make, masked):
    torch.manual_seed(0)
    fn = make().double()
    dim = fn.norm.normalized_shape[0]
    a, b, d = (torch.randn(3, 5, dim, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64).view(3, 1, 1) if masked else None
    params = list(fn.parameters())

    b_ref = b.clone().requires_grad_(True)
    want = a + (fn(b_ref) if mask is None else fn(b_ref) * mask)
    want_grads = torch.autograd.grad(want, [b_ref, *params], d)

    out = a.clone()
    with torch.no_grad():
        assert fn.fuses_coupling(b)
        fn.coupling_forward(out, b, mask)
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    swap = stand_ins(params, [True] * len(params))
    with torch.no_grad(), parameters_swapped(fn.modules(), swap):
        d_b = fn.coupling_backward(out, b, d, mask)
    torch.testing.assert_close(out, a, rtol=0, atol=1e-13)  # taken back out: the input again, up to rounding
    for got, expected in zip([d_b, *(p.grad for p in params)], want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_without_a_stream_to_rebuild_the_backward_only_back_propagates():
    """The first coupling of a stream takes the stack's kept input: nothing to take out."""
    torch.manual_seed(0)
    fn = MlpBranch(16, 2.0).double()
    b, d = torch.randn(2, 4, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    params = list(fn.parameters())
    with torch.no_grad(), parameters_swapped(fn.modules(), stand_ins(params, [True] * len(params))):
        d_b = fn.coupling_backward(None, b, d, None)
    b_ref = b.clone().requires_grad_(True)
    want = torch.autograd.grad(fn(b_ref), [b_ref, *params], d)
    for got, expected in zip([d_b, *(p.grad for p in params)], want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# -- memory and speed ---------------------------------------------------------------------------------

def test_rev_vit_small_holds_under_2_5_mb_per_image_and_less_than_recomputed():
    """Rev-ViT-S at batch 4, whole batch: the kept input, Y1, Y2, dY1, dY2 (5 units of one (B, N, D) stream)
    and F's fused backward (LayerNorm's output and its gradient, one head's q, k, v, output and their
    gradients: 3.33 units). Measured 8.35 units of (B, 196, D) (8.31 of the 197-token stream), 2.40 MB per
    image; recomputed in halves 8.68."""
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_small_patch16_224", depth=3, drop_path_rate=0.0)
    x = torch.randn(4, 3, 224, 224)
    unit = x.shape[0] * model.patch_embed.num_patches * model.embed_dim * 4
    fused = measure_training_memory(model, x).peak_bytes
    assert fused <= 8.45 * unit and fused / x.shape[0] / 2 ** 20 <= 2.5
    assert fused < measure_training_memory(model.set_chunking(fused=False), x).peak_bytes


def test_the_peak_is_flat_in_depth_and_single_images_hold_less():
    """Rev-ViT-S at batch 4: 8.35 units of one (B, N, D) stream at depths 2 and 6; in single images 7.0 (the
    forward's final norm is then the peak)."""
    x = torch.randn(4, 3, 224, 224)

    def peak(depth: int, chunk_bytes=None) -> int:
        torch.manual_seed(0)
        model = timm.create_model("rev_vit_small_patch16_224", depth=depth, drop_path_rate=0.1)
        return measure_training_memory(model.set_chunking(chunk_bytes), x).peak_bytes

    assert peak(6) == pytest.approx(peak(2), rel=0.01)
    assert peak(2, 1) < 0.9 * peak(2)


def test_automatic_pieces_whole_unless_a_branch_holds_more_than_three_and_a_half_inputs():
    large = torch.empty(4, 1200, 192)  # over the 8 MiB under which nothing is split
    assert chunks.fused_pieces(MlpBranch(192, 4.0), large, None) == [None]  # 2 + 2 * (2/3) = 3.33 units
    assert chunks.fused_pieces(AttentionBranch(192, 6, True), large, None) == [None]  # 2 + 8/6 = 3.3
    assert chunks.fused_pieces(AttentionBranch(192, 3, True), large, None) == halves  # 2 + 8/3 = 4.7
    assert chunks.fused_pieces(AttentionBranch(192, 3, True), large[:, :10], None) == [None]  # small: whole


def test_the_forward_goes_through_larger_blocks_than_the_backward():
    """No gradients are alive in the forward: half the heads and two output-widths of hidden columns at a time
    (3.5 and 3 units of the input); the backward a sixth of the heads and 2/3 of an output-width (3.33)."""
    mlp, attn = MlpBranch(192, 4.0), AttentionBranch(192, 6, True)
    assert len(mlp.mlp.column_blocks(forward=True)) == 2 and len(mlp.mlp.column_blocks()) == 6
    assert len(attn.attn.head_groups(forward=True)) == 2 and len(attn.attn.head_groups()) == 6
    assert mlp.coupling_units(True) == pytest.approx(3) and mlp.coupling_units(False) == pytest.approx(10 / 3)
    assert attn.coupling_units(True) == pytest.approx(3.5) and attn.coupling_units(False) == pytest.approx(10 / 3)
    large = torch.empty(4, 1200, 192)
    for fn in (mlp, attn, AttentionBranch(192, 3, True)):
        assert chunks.fused_pieces(fn, large, None, forward=True) == [None]


def test_the_forward_and_backward_use_their_own_blocks(monkeypatch):
    """Width of each block of hidden columns (MLP 24 -> 48 -> 24) and of each group of heads (6 heads of 4)
    the pass makes, in the forward and in the backward."""
    from revvit.layers.attention import Attention
    from revvit.layers.mlp import Mlp
    widths = {"forward": [], "backward": []}
    phase = ["forward"]
    hidden, qkv = Mlp._hidden, Attention._group_qkv
    monkeypatch.setattr(Mlp, "_hidden", lambda self, x, cols: (
        widths[phase[0]].append(("mlp", cols.stop - cols.start)) or hidden(self, x, cols)))
    monkeypatch.setattr(Attention, "_group_qkv", lambda self, x, cols, batch: (
        widths[phase[0]].append(("attention", cols.stop - cols.start)) or qkv(self, x, cols, batch)))
    stack = vit_stack(1)
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    y1, y2 = stack(x, x)
    phase[0] = "backward"
    (y1.sum() + y2.sum()).backward()
    assert sorted(set(widths["forward"])) == [("attention", 12), ("mlp", 48)]
    assert sorted(set(widths["backward"])) == [("attention", 4), ("mlp", 16)]


def test_a_budget_splits_the_batch_down_to_single_samples_and_no_further():
    b, one = torch.empty(4, 12, 64), torch.empty(1, 12, 64)
    g, f = MlpBranch(64, 4.0), AttentionBranch(64, 8, True)
    singles = [(slice(k, k + 1),) for k in range(4)]
    assert chunks.fused_pieces(g, b, 1) == chunks.fused_pieces(f, b, 1) == singles
    assert chunks.fused_pieces(g, one, 1) == chunks.fused_pieces(f, one, 1) == [None]
    assert chunks.fused_pieces(g, b, int(g.coupling_units(False) * b.nbytes)) == [None]
    assert chunks.fused_pieces(g, b, int(g.coupling_units(False) * b.nbytes) // 2) == halves


# -- where the fused pass steps aside --------------------------------------------------------------------

def test_fused_false_recomputes_every_coupling_under_autograd(fused_calls):
    stack = vit_stack(2)
    stack.set_chunking(None, fused=False)
    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert not fused_calls


def test_a_hook_inside_a_branch_is_called_in_the_recomputation_instead(fused_calls):
    stack = vit_stack(2)
    seen = []
    stack.blocks[1].g.mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert "MlpBranch" in fused_calls  # the other blocks' G
    assert len(seen) == 3  # reversible forward and recomputation, then autograd's forward


class Scaled(MlpBranch):
    def forward(self, x):
        return super().forward(x) * 0.5


def test_a_subclass_with_a_forward_of_its_own_is_called_not_bypassed(fused_calls):
    torch.manual_seed(0)
    stack = ReversibleStack([ReversibleBlock(AttentionBranch(24, 6, True), Scaled(24, 2.0), 0.2)
                             for _ in range(2)]).double()
    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert "Scaled" not in fused_calls and "AttentionBranch" in fused_calls


def test_autograd_grad_and_parallel_mode_recompute_and_stay_exact(fused_calls):
    stack = vit_stack(2)
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    params = list(stack.parameters())
    torch.manual_seed(0)  # the same drop-path draws in both steps
    handed = torch.autograd.grad(two_stream_loss(stack(x, x)), params)
    assert not fused_calls and all(p.grad is None for p in params)
    stack.set_backprop("autograd")
    torch.manual_seed(0)
    two_stream_loss(stack(x, x)).backward()
    for p, g in zip(params, handed):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    stack.set_backprop("reversible")
    fused_calls.clear()
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss,
                                       mode="parallel")
    assert not fused_calls


def test_frozen_parameters_get_no_gradient_and_the_others_are_exact(fused_calls):
    stack = vit_stack(2)
    for block in stack.blocks:
        block.f.norm.requires_grad_(False)
        block.f.attn.q.requires_grad_(False)
        block.g.mlp.fc2.bias.requires_grad_(False)
    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert fused_calls and all(p.grad is None for p in stack.parameters() if not p.requires_grad)


def test_a_strided_stack_input_and_recomputed_couplings_above_fused_ones_are_exact(fused_calls):
    """The stack's input laid out token-minor (a patch embedding's transpose) and the top block recomputed (a
    hook on it): the streams the fused blocks below rebuild in place are laid out in rows all the same."""
    stack = vit_stack(3)
    stack.blocks[2].f.attn.register_forward_hook(lambda m, i, o: None)
    stack.blocks[2].g.mlp.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(3, 24, 7, dtype=torch.float64).transpose(1, 2)
    assert not x.is_contiguous()
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert fused_calls.count("AttentionBranch") == fused_calls.count("MlpBranch") == 2


def test_a_bad_fused_setting_is_refused():
    with pytest.raises(ValueError, match="fused"):
        vit_stack(1).set_chunking(None, fused="no")


def test_a_hook_registered_after_the_forward_is_called_in_the_backward(fused_calls):
    """The coupling was fused in the forward; by the backward its G has a hook: recomputed instead."""
    stack = vit_stack(2)
    seen = []

    def forward(s, v):
        out = s(v, v)
        if not seen:
            s.blocks[1].g.mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        return out

    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24, dtype=torch.float64), forward=forward,
                                       loss=two_stream_loss)
    assert fused_calls.count("MlpBranch") == 1  # block 0's G
    assert len(seen) == 2  # the reversible backward's recomputation, then autograd's forward


def test_backward_to_some_parameters_only_fills_those(fused_calls):
    stack = vit_stack(2)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    wanted = [stack.blocks[0].g.mlp.fc1.weight, stack.blocks[1].f.attn.q.bias, stack.blocks[1].f.norm.weight]
    torch.manual_seed(0)
    two_stream_loss(stack(x, x)).backward(inputs=wanted)
    assert fused_calls
    got = [p.grad.clone() for p in wanted]
    assert all(p.grad is None for p in stack.parameters() if all(p is not w for w in wanted))
    stack.zero_grad(set_to_none=True)
    stack.set_backprop("autograd")
    torch.manual_seed(0)
    two_stream_loss(stack(x, x)).backward()
    for g, p in zip(got, wanted):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams_are_recomputed_not_fused(dtype, fused_calls):
    stack = vit_stack(2, dtype=dtype)
    x = torch.randn(3, 7, 24, dtype=dtype)
    two_stream_loss(stack(x, x)).float().backward()
    assert not fused_calls and all(p.grad is not None for p in stack.parameters())


def test_a_compiled_branch_or_body_is_called_not_bypassed(fused_calls):
    stack = vit_stack(2)
    stack.blocks[0].g = torch.compile(stack.blocks[0].g, backend="eager")
    stack.blocks[1].f.attn = torch.compile(stack.blocks[1].f.attn, backend="eager")
    assert_reversible_matches_autograd(stack, torch.randn(3, 7, 24, dtype=torch.float64),
                                       forward=lambda s, v: s(v, v), loss=two_stream_loss)
    assert fused_calls.count("MlpBranch") == fused_calls.count("AttentionBranch") == 1
