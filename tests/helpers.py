"""Shared assertions for the tests.

    out_rev, out_ag = assert_reversible_matches_autograd(model, x)

runs one training step in each backprop mode on the same weights, input and random draws, and checks
that the input gradient and every parameter gradient agree, and that every parameter that requires a
gradient received one in both modes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["RTOL", "assert_reversible_matches_autograd", "weighted_sum", "cli_refusal"]

# Relative error (of the gradient norm) allowed between reversible and autograd backprop, per dtype: the
# reversible backward rebuilds activations by subtraction, so it differs by rounding only.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def weighted_sum(out: Tensor) -> Tensor:
    """A loss whose gradient differs per output element (a plain sum would hide transposed gradients)."""
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def _step(model: nn.Module, x: Tensor, mode: str, forward: Callable, loss: Callable, seed: int):
    model.set_backprop(mode)  # models return self, a ReversibleStack returns None
    model.train().zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same drop path / dropout draws in both modes
    out = forward(model, x)
    loss(out).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{mode} backprop: no gradient reached {missing}"
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out, grads


def assert_reversible_matches_autograd(model: nn.Module, x: Tensor, *, forward: Optional[Callable] = None,
                                       loss: Callable = weighted_sum, seed: int = 0, rtol: Optional[float] = None,
                                       mode: str = "reversible") -> tuple:
    """One seeded training step of `model` (anything with `set_backprop` and `backprop`) on `x` in `mode`
    and in "autograd" backprop; asserts that every parameter that requires grad gets a gradient and that
    the input gradient and each parameter's gradient agree to `rtol` relative error (default: per dtype,
    `RTOL`). `forward(model, x)` (default `model(x)`; a ReversibleStack: `lambda s, x: s(x, x)`) may
    return any structure `loss` reduces to a scalar. Returns the two outputs (`mode`, autograd); the
    model is left in the backprop mode it was in.
    """
    forward = forward or (lambda m, v: m(v))
    rtol = RTOL[x.dtype] if rtol is None else rtol
    before = model.backprop
    try:
        out_rev, g_rev = _step(model, x, mode, forward, loss, seed)
        out_ag, g_ag = _step(model, x, "autograd", forward, loss, seed)
    finally:
        model.set_backprop(before)
    # each gradient against its own size, floored by the whole gradient's so a near-zero one is not judged
    # by its rounding alone
    scale = torch.cat([g.flatten() for g in g_ag.values()]).norm()
    for name, ag in g_ag.items():
        err = (g_rev[name] - ag).norm() / torch.maximum(ag.norm(), 1e-3 * scale).clamp_min(1e-30)
        assert err < rtol, f"{name}: {mode} and autograd gradients differ (relative error {err:.2e} >= {rtol})"
    return out_rev, out_ag


def cli_refusal(capsys, argv: list[str]) -> tuple[str, str]:
    """Run the CLI on `argv`, expecting a refusal: exit 1 (or 2, argparse's), no traceback and no "unexpected"
    error, the last error line `revvit <command>: error: ...` (argparse puts its usage lines above it).
    Returns (that line, what was printed to stdout)."""
    from revvit.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code in (1, 2), captured
    assert "Traceback" not in err and "unexpected" not in err, err
    command = " ".join(argv[:2] if argv[0] == "detect" else argv[:1])
    assert err.splitlines()[-1].startswith(f"revvit {command}: error: "), err
    return err.splitlines()[-1], captured.out
