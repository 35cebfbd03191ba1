"""torch.compile over a reversible model: the stack is one graph break whatever its depth, and the compiled
model trains with the eager model's gradients."""
import pytest
import timm
import torch
import torch._dynamo


def tiny(depth: int, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("rev_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, num_classes=5,
                             **kwargs)


def test_graph_breaks_do_not_grow_with_depth():
    x = torch.randn(2, 3, 32, 32)
    breaks = [torch._dynamo.explain(tiny(depth))(x).graph_break_count for depth in (2, 6)]
    assert breaks[0] == breaks[1] <= 3


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_gets_the_eager_gradients(backend):
    model = tiny(3, drop_path_rate=0.0).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).logsumexp(-1).sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x).logsumexp(-1).sum().backward()
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
