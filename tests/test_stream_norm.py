"""The lean model end: a LayerNorm over two streams side by side without their concatenation, computed
backward slice by slice, and a mean over tokens whose gradient is a broadcast view."""
import pytest
import torch
from torch import nn

import revvit.layers.stream_norm as stream_norm
from revvit.layers import mean_tokens, norm_streams


def streams(dtype=torch.float64, shape=(3, 10, 6)):
    torch.manual_seed(0)
    return [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(2)]


def layer_norm(width: int, dtype=torch.float64, affine: bool = True) -> nn.LayerNorm:
    norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    return norm


def gradients(fn, norm, y1, y2, upstream):
    out = fn(norm, y1, y2)
    inputs = [y1, y2] + [p for p in norm.parameters()]
    return out, torch.autograd.grad(out, inputs, upstream)


def plain(norm, y1, y2):
    return norm(torch.cat([y1, y2], dim=-1))


@pytest.fixture(params=[1, 4], ids=["whole", "sliced"])
def slices(request, monkeypatch):
    """The backward in one go, or in 4 token slices (however small the input)."""
    monkeypatch.setattr(stream_norm, "MIN_SLICE_BYTES", 0)
    monkeypatch.setattr(stream_norm, "SLICES", request.param)
    return request.param


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("affine", [True, False])
def test_norm_streams_gives_the_plain_layer_norm_of_the_concatenation_and_its_gradients(slices, dtype, tol, affine):
    y1, y2 = streams(dtype)
    norm = layer_norm(12, dtype, affine)
    upstream = torch.randn(3, 10, 12, dtype=dtype)
    out, grads = gradients(norm_streams, norm, y1, y2, upstream)
    ref_out, ref_grads = gradients(plain, norm, y1, y2, upstream)
    assert torch.equal(out, ref_out)
    assert len(grads) == len(ref_grads) == (4 if affine else 2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def test_each_stream_gets_a_contiguous_gradient_buffer_of_its_own(slices):
    """What reaches the streams' producer (a reversible stack's top block): not halves of one buffer (which
    it would have to copy), as `norm(cat(...))` gives. Seen by hooks on non-leaf streams (a leaf's `.grad`
    would be a copy either way)."""
    seen = {}

    def look(i):
        def hook(g):
            seen[i] = (g._base is None, g.is_contiguous(), g.untyped_storage().data_ptr())
        return hook

    def run(fn):
        seen.clear()
        a, b = streams()
        y1, y2 = a * 1.0, b * 1.0
        y1.register_hook(look(1))
        y2.register_hook(look(2))
        fn(layer_norm(12), y1, y2).square().sum().backward()
        return dict(seen)

    ours, cat = run(norm_streams), run(plain)
    assert ours[1][:2] == ours[2][:2] == (True, True) and ours[1][2] != ours[2][2]
    assert not cat[1][0] and cat[1][2] == cat[2][2]  # the plain path: views of one buffer (the test can tell)


def test_a_broadcast_upstream_gradient_gives_the_gradients_of_its_dense_copy(slices):
    """The mean's gradient (stride 0 over tokens) is read slice by slice, never made whole."""
    y1, y2 = streams()
    norm = layer_norm(12)
    g = torch.randn(3, 1, 12, dtype=torch.float64).expand(3, 10, 12)
    _, broadcast = gradients(norm_streams, norm, y1, y2, g)
    _, dense = gradients(norm_streams, norm, y1, y2, g.contiguous())
    _, ref = gradients(plain, norm, y1, y2, g.contiguous())
    for a, b, r in zip(broadcast, dense, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_only_the_streams_that_need_a_gradient_get_one(slices):
    y1, y2 = streams()
    y2 = y2.detach()
    norm = layer_norm(12)
    norm_streams(norm, y1, y2).sum().backward()
    assert y1.grad is not None and y2.grad is None and norm.weight.grad is not None


@pytest.mark.parametrize("norm", [nn.Identity(), nn.RMSNorm(12, dtype=torch.float64)], ids=["identity", "rms"])
def test_another_norm_gets_the_concatenation(norm):
    y1, y2 = streams()
    out = norm_streams(norm, y1, y2)
    assert torch.equal(out, norm(torch.cat([y1, y2], -1)))
    out.sum().backward()
    assert y1.grad is not None and y2.grad is not None


def test_without_grad_recording_it_is_the_plain_norm():
    y1, y2 = streams()
    norm = layer_norm(12)
    with torch.no_grad():
        assert torch.equal(norm_streams(norm, y1, y2), plain(norm, y1, y2))


def test_mean_tokens_backward_is_a_broadcast_view_of_the_plain_gradient():
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad(mean_tokens(x), x, g)
    (ref,) = torch.autograd.grad(x.mean(dim=1), x, g)
    assert torch.equal(mean_tokens(x), x.mean(dim=1))
    assert torch.equal(ours, ref)
    assert ours.stride(1) == 0  # one (B, C) tensor, seen N times


def test_a_second_derivative_is_refused_not_wrong():
    y1, y2 = streams()
    out = norm_streams(layer_norm(12), y1, y2).square().sum()
    (g,) = torch.autograd.grad(out, y1, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_lean_false_is_the_plain_norm_and_twice_differentiable():
    y1, y2 = streams()
    norm = layer_norm(12)
    out = norm_streams(norm, y1, y2, lean=False).square().sum()
    (g,) = torch.autograd.grad(out, y1, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), y1)
    ref = plain(norm, y1, y2).square().sum()
    (rg,) = torch.autograd.grad(ref, y1, create_graph=True)
    (rgg,) = torch.autograd.grad(rg.square().sum(), y1)
    assert torch.equal(gg, rgg)


def test_torch_func_transforms_get_the_plain_gradients():
    from torch.func import grad, vmap

    y1, y2 = (y.detach() for y in streams())
    norm = layer_norm(12)

    def loss(a, b):
        return mean_tokens(norm_streams(norm, a, b)).square().sum()

    def ref(a, b):
        return plain(norm, a, b).mean(1).square().sum()

    torch.testing.assert_close(grad(loss)(y1, y2), grad(ref)(y1, y2), rtol=1e-12, atol=1e-12)
    per_sample = vmap(grad(loss), in_dims=(0, 0))(y1.unsqueeze(1), y2.unsqueeze(1))
    torch.testing.assert_close(per_sample, vmap(grad(ref), in_dims=(0, 0))(y1.unsqueeze(1), y2.unsqueeze(1)))


def test_a_norm_with_hooks_or_its_own_forward_is_called_as_a_module():
    y1, y2 = streams()
    calls = []
    norm = layer_norm(12)
    norm.register_forward_hook(lambda *_: calls.append("hook"))
    norm_streams(norm, y1, y2)

    class Scaled(nn.LayerNorm):
        def forward(self, x):
            calls.append("forward")
            return 2 * super().forward(x)

    scaled = Scaled(12, dtype=torch.float64)
    out = norm_streams(scaled, y1, y2)
    assert calls == ["hook", "forward"]
    assert torch.equal(out, 2 * nn.functional.layer_norm(torch.cat([y1, y2], -1), (12,), scaled.weight, scaled.bias))


def test_no_tokens_is_no_error():
    y1, y2 = streams(shape=(2, 0, 6))
    out = norm_streams(layer_norm(12), y1, y2)
    assert out.shape == (2, 0, 12)
    out.sum().backward()
    assert y1.grad.shape == y1.shape
