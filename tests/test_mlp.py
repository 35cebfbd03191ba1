"""The MLP without a graph (the reversible forward, inference) activates its hidden layer in place, and
recomputed by the reversible engine it back-propagates holding two hidden-sized tensors, not three (in
pieces: its hidden layer and one block as large as its output)."""
import pytest
import timm
import torch

from helpers import assert_reversible_matches_autograd
from revvit.bench.memory import StorageMeter, measure_training_memory
from revvit.layers import mlp
from revvit.layers.linear import Linear
from revvit.layers.mlp import Mlp, MlpBranch
from revvit.reversible import ReversibleBlock, ReversibleStack


def mlp_and_input():
    torch.manual_seed(0)
    return Mlp(16, 64), torch.randn(2, 10, 16)


def test_without_grad_the_output_is_the_same_and_the_hidden_layer_is_held_once():
    mlp, x = mlp_and_input()
    with torch.enable_grad():
        expected = mlp(x)
    with torch.no_grad(), StorageMeter() as meter:
        out = mlp(x)
    assert torch.equal(out, expected)
    hidden = x.shape[0] * x.shape[1] * 64 * 4
    assert meter.peak_bytes < 2 * hidden


def test_a_hook_on_the_activation_is_still_called_without_grad():
    mlp, x = mlp_and_input()
    mlp.act.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    with torch.no_grad():
        out = mlp(x)
    torch.testing.assert_close(out, mlp.fc2.bias.expand_as(out))


def mlp_stack(depth: int, approximate: str = "none", dtype=torch.float64):
    torch.manual_seed(0)
    blocks = [ReversibleBlock(MlpBranch(16, 4.0), MlpBranch(16, 4.0), drop_path=0.2) for _ in range(depth)]
    stack = ReversibleStack(blocks).to(dtype)
    for m in stack.modules():
        if isinstance(m, torch.nn.GELU):
            m.approximate = approximate
    return stack


@pytest.mark.parametrize("chunk_bytes", [0, 1])  # whole (one block of H), in pieces (H in blocks too)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_recomputed_mlps_gradients_equal_autograds(depth, approximate, chunk_bytes, monkeypatch):
    calls, function = [], mlp._RecomputedMlp
    monkeypatch.setattr(mlp, "_RecomputedMlp", type("Spy", (), {
        "apply": staticmethod(lambda *a: calls.append(1) or function.apply(*a))}))
    stack = mlp_stack(depth, approximate)
    stack.set_chunking(chunk_bytes, fused=False)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v), loss=lambda out: out[0].sum()
                                       + out[1].square().sum())
    assert calls  # the recomputation went through the recomputed MLP's own backward


@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_in_blocks_its_output_is_bitwise_the_plain_mlps(blocks, monkeypatch):
    """The engine rebuilds a stream by subtracting the recomputed G(Y1): it must be the value the forward
    added, to the last bit, however many blocks of rows the recomputation makes GELU(H) in."""
    monkeypatch.setattr(mlp, "_block_count", lambda hidden, out: blocks)
    mlp_, x = mlp_and_input()
    params = (mlp_.fc1.weight, mlp_.fc1.bias, mlp_.fc2.weight, mlp_.fc2.bias)
    with torch.no_grad():
        expected = mlp_(x)
    assert torch.equal(mlp._RecomputedMlp.apply(x, params, "none"), expected)


def test_an_unsplit_recomputation_holds_two_hidden_layers_not_three():
    """Rev-ViT-S, chunking off: the peak is G's backward, which autograd's graph would make with H, GELU(H)
    and dA alive (18 units of one (B, N, D) stream); recomputing GELU(H) and writing dH over dA: 15."""
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_small_patch16_224", depth=2, drop_path_rate=0.0).set_chunking(0, fused=False)
    x = torch.randn(4, 3, 224, 224)
    unit = x.shape[0] * model.patch_embed.num_patches * model.embed_dim * 4
    assert measure_training_memory(model, x).peak_bytes <= 15.5 * unit


class Doubled(Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_linear_layer_with_its_own_forward_is_called_not_bypassed():
    stack = mlp_stack(2)
    for block in stack.blocks:
        fc1 = block.g.mlp.fc1
        block.g.mlp.fc1 = Doubled(fc1.in_features, fc1.out_features).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v),
                                       loss=lambda out: out[0].sum() + out[1].square().sum())


def test_without_grad_a_global_module_hook_still_sees_the_activation():
    mlp_, x = mlp_and_input()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            mlp_(x)
    finally:
        handle.remove()
    assert "GELU" in seen
