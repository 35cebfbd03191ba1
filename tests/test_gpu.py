"""CUDA correctness: every backprop mode against autograd on the GPU (`pytest -m gpu`; skipped without CUDA).

What only a GPU can show: the CUDA generator replay of drop path and dropout, fp16/bf16 autocast with a
grad scaler, and the "parallel" mode's two-stream schedule (side streams, events, tensors recorded on
the streams that use them).
"""
import pytest
import timm
import torch
from torch import nn

import revvit  # noqa: F401
from revvit.reversible import ReversibleBlock, ReversibleStack

pytestmark = pytest.mark.gpu
MODES = ["reversible", "parallel"]
CUDA = torch.device("cuda")


class Branch(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm, self.fc, self.drop = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(torch.nn.functional.gelu(self.fc(self.norm(x))))


def stack_of(depth: int, dim: int, dtype: torch.dtype) -> ReversibleStack:
    torch.manual_seed(0)
    blocks = [ReversibleBlock(Branch(dim), Branch(dim), drop_path=0.3) for _ in range(depth)]
    return ReversibleStack(blocks).to(CUDA, dtype)


def grads(module, x, mode, seed=1, amp=None, scaler=None):
    module.set_backprop(mode)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
        out = module(x, x) if isinstance(module, ReversibleStack) else module(x)
        out = torch.cat(out, -1) if isinstance(out, tuple) else out
        loss = (out.float() * torch.linspace(-1, 1, out.shape[-1], device=CUDA)).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


def rel_error(got, want) -> float:
    diff = torch.cat([(g.double() - w.double()).flatten() for g, w in zip(got, want)])
    ref = torch.cat([w.double().flatten() for w in want])
    return (diff.norm() / ref.norm()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7])
def test_fp64_equals_autograd_on_cuda(depth, mode):
    stack = stack_of(depth, 16, torch.float64)
    x = torch.randn(4, 9, 16, device=CUDA, dtype=torch.float64)
    assert rel_error(grads(stack, x, mode), grads(stack, x, "autograd")) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_fp32_equals_autograd_on_cuda(mode):
    stack = stack_of(6, 64, torch.float32)
    x = torch.randn(8, 33, 64, device=CUDA)
    assert rel_error(grads(stack, x, mode), grads(stack, x, "autograd")) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_with_grad_scaler_equals_autograd_under_the_same_autocast(mode, amp):
    stack = stack_of(5, 64, torch.float32)
    x = torch.randn(8, 33, 64, device=CUDA)
    scale = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    got = grads(stack, x, mode, amp=amp, scaler=scale)
    want = grads(stack, x, "autograd", amp=amp, scaler=scale)
    assert all(torch.isfinite(g).all() for g in got)
    assert rel_error(got, want) < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_cuda_generator_is_replayed_and_left_untouched(mode):
    stack = stack_of(4, 32, torch.float64)
    x = torch.randn(4, 9, 32, device=CUDA, dtype=torch.float64)
    first, second = grads(stack, x, mode, seed=3), grads(stack, x, mode, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    grads(stack, x, mode, seed=4)
    after_saving = torch.rand(4, device=CUDA)
    grads(stack, x, "autograd", seed=4)
    assert torch.equal(after_saving, torch.rand(4, device=CUDA))


@pytest.mark.parametrize("mode", MODES)
def test_two_forwards_then_one_backward_on_cuda(mode):
    stack = stack_of(4, 16, torch.float64)
    a, b = (torch.randn(3, 9, 16, device=CUDA, dtype=torch.float64) for _ in range(2))

    def run(m):
        stack.set_backprop(m)
        stack.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        (ya1, ya2), (yb1, yb2) = stack(a, a), stack(b, b)
        (ya1.sum() + ya2.square().sum() + 2 * yb1.sum() + yb2.square().sum()).backward()
        return [p.grad for p in stack.parameters()]

    assert rel_error(run(mode), run("autograd")) < 1e-10


TINY = {"rev_vit": dict(img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["rev_vit_tiny_patch16_224", "rev_mvit_tiny", "rev_mvit_tiny_video"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_every_family_equals_autograd_on_cuda(name, mode, amp):
    kwargs = TINY["rev_vit"] if name.startswith("rev_vit") else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.2, **kwargs).to(CUDA)
    if amp is None:
        model = model.double()
    video = "video" in name
    x = torch.randn(2, 3, *((4,) if video else ()), 32, 32, device=CUDA,
                    dtype=torch.float64 if amp is None else torch.float32)
    got, want = grads(model, x, mode, amp=amp), grads(model, x, "autograd", amp=amp)
    assert rel_error(got, want) < (1e-10 if amp is None else 1e-4)
