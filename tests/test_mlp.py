"""The MLP without a graph (the reversible forward, inference) activates its hidden layer in place."""
import torch

from revvit.bench.memory import StorageMeter
from revvit.layers.mlp import Mlp


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
