"""torch.compile over a reversible model: the stack is one graph break whatever its depth, and the compiled
model trains with the eager model's gradients."""
import pytest
import timm
import torch
import torch._dynamo

from helpers import weighted_sum
from revvit.reversible import compile_blocks
from test_models import NAMES, example_input, small


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


REVERSIBLE = [n for n in NAMES if hasattr(small(n), "set_chunking")]


def _compiled_matches_eager(name: str, chunk_bytes: int) -> None:
    torch._dynamo.reset()
    eager = small(name, num_classes=5, drop_path_rate=0.2).double().set_chunking(chunk_bytes)
    model = compile_blocks(small(name, num_classes=5, drop_path_rate=0.2).double().set_chunking(chunk_bytes),
                           backend="aot_eager")
    x = example_input(eager).double()
    for m in (eager, model):
        torch.manual_seed(3)
        weighted_sum(m(x)).backward()
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", REVERSIBLE)
def test_compiled_blocks_give_the_eager_gradients(name):
    # Regional compilation (F and G compiled, the engine eager), with drop path, recomputations whole
    _compiled_matches_eager(name, 0)


@pytest.mark.parametrize("name", [n for n in REVERSIBLE if n.startswith("rev_vit")][:1] + [
    pytest.param(n, marks=pytest.mark.slow) for n in REVERSIBLE if not n.startswith("rev_vit")][:1])
def test_compiled_head_group_pieces_give_the_eager_gradients(name):
    # The finest split: F's head groups go through the compiled `forward_part`, G's token slices through
    # the compiled forward (slow for Rev-MViT: dynamo compiles many pooling-attention variants)
    _compiled_matches_eager(name, 1)


def test_compiled_blocks_compile_once_whatever_the_depth():
    graphs = []
    for depth in (2, 6):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = compile_blocks(tiny(depth), backend="eager")
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0
