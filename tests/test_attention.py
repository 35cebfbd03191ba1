"""Attention recomputed by the reversible engine in pieces (`fused=False`) goes through one group of heads at a
time (`_RecomputedAttention`): the same output as `Attention.forward`, the same gradients as autograd, and less
memory than autograd's graph of it. (Attention's fused coupling: tests/test_fused.py.)"""
import pytest
import timm
import torch

from helpers import assert_reversible_matches_autograd
from revvit.bench.memory import measure_training_memory
from revvit.layers import attention
from revvit.layers.attention import Attention, AttentionBranch
from revvit.layers.mlp import MlpBranch
from revvit.reversible import ReversibleBlock, ReversibleStack
from revvit.reversible import pieces as chunks


@pytest.fixture
def recomputed_calls(monkeypatch):
    """Calls of the recomputed attention Function (one per recomputed piece of F)."""
    calls, function = [], attention._RecomputedAttention
    monkeypatch.setattr(attention, "_RecomputedAttention", type("Spy", (), {
        "apply": staticmethod(lambda *a: calls.append(a[2]) or function.apply(*a))}))
    return calls


def attention_stack(depth: int, heads: int, qkv_bias: bool) -> ReversibleStack:
    torch.manual_seed(0)
    dim = 8 * heads
    blocks = [ReversibleBlock(AttentionBranch(dim, heads, qkv_bias), MlpBranch(dim, 2.0), drop_path=0.2)
              for _ in range(depth)]
    stack = ReversibleStack(blocks).double()
    stack.set_chunking(None, fused=False)
    return stack


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("heads, qkv_bias", [(1, True), (3, False), (6, True)])  # 1, 3 and 4 uneven groups
def test_the_recomputed_attentions_gradients_equal_autograds(depth, heads, qkv_bias, recomputed_calls, monkeypatch):
    monkeypatch.setattr(chunks, "AUTO_MIN_BYTES", 0)  # the automatic split (halves of the batch) even here
    stack = attention_stack(depth, heads, qkv_bias)
    x = torch.randn(5, 7, 8 * heads, dtype=torch.float64)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v),
                                       loss=lambda out: out[0].sum() + out[1].square().sum())
    assert recomputed_calls and set(recomputed_calls) == {heads}


def test_an_unsplit_recomputation_does_not_use_it(recomputed_calls):
    stack = attention_stack(2, 3, True)
    stack.set_chunking(0, fused=False)
    x = torch.randn(4, 7, 24, dtype=torch.float64)
    assert_reversible_matches_autograd(stack, x, forward=lambda s, v: s(v, v),
                                       loss=lambda out: out[0].sum() + out[1].square().sum())
    assert not recomputed_calls


def test_its_output_is_bitwise_that_of_the_plain_forward():
    """The engine rebuilds a stream by subtracting the recomputed F(X2) from Y1: it must be the value the
    forward added, to the last bit."""
    torch.manual_seed(0)
    attn = Attention(96, 6)
    x = torch.randn(3, 50, 96)
    params = tuple(t for layer in (attn.q, attn.k, attn.v, attn.proj) for t in (layer.weight, layer.bias))
    with torch.no_grad():
        expected = attn(x)
    assert torch.equal(attention._RecomputedAttention.apply(x, params, attn.num_heads), expected)


def test_it_holds_less_than_autograds_graph_of_attention(monkeypatch):
    """Rev-ViT-S at batch 4 in halves of the batch: with autograd's graph, F's backward holds dO and all of
    dQ, dK, dV next to q, k, v and is the peak (9.5 units of one (B, N, D) stream); one group of heads at a
    time, written over q, k, v, it holds about a unit less (8.5, where G's backward is as high)."""
    torch.manual_seed(0)
    model = timm.create_model("rev_vit_small_patch16_224", depth=2, drop_path_rate=0.0).set_chunking(fused=False)
    x = torch.randn(4, 3, 224, 224)
    unit = x.shape[0] * model.patch_embed.num_patches * model.embed_dim * 4
    by_groups = measure_training_memory(model, x).peak_bytes
    monkeypatch.setattr(Attention, "_plain", lambda self: False)
    graph = measure_training_memory(model, x).peak_bytes
    assert by_groups <= graph - 0.8 * unit
