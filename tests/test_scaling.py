"""The budget search of `revvit bench --budget`: measured, monotone, and plotted (CPU here; CUDA on a GPU)."""
import pytest
import torch

import revvit  # noqa: F401
from revvit.bench.scaling import budget_table, max_batch, parse_bytes, plot_depth_sweep, step_peak_bytes, vit_methods

CPU = torch.device("cpu")
SAMPLE = (3, 32, 32)


def tiny_vit_methods(depth: int):
    methods = vit_methods("tiny", depth, 32)
    for m in methods:  # patch 8 at 32 px: 16 tokens, fast on CPU
        build = m.build
        m.build = lambda build=build: _patch8(build)
    return methods


def _patch8(build):
    import timm

    model = build()
    name = model.default_cfg["architecture"]
    kwargs = dict(depth=len(getattr(model, "stack", getattr(model, "blocks", []))), img_size=32, patch_size=8,
                  embed_dim=64, num_heads=2, drop_path_rate=0.0, num_classes=10)
    rebuilt = timm.create_model(name, **kwargs)
    if hasattr(model, "backprop"):
        rebuilt.set_backprop(model.backprop)
    if getattr(model, "grad_checkpointing", False):
        rebuilt.set_grad_checkpointing(True)
    return rebuilt


def test_parse_bytes_reads_gpu_sizes_and_refuses_nonsense():
    assert parse_bytes("16GB") == parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1e6") == 10**6
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError, match="memory"):
            parse_bytes(bad)


def test_peak_of_a_training_step_counts_parameters_gradients_and_adam_state():
    model = tiny_vit_methods(2)[2].build()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = step_peak_bytes(model, 2, SAMPLE, CPU)
    assert peak > 4 * params  # parameters, gradients and AdamW's two moments are all alive at once
    assert step_peak_bytes(model, 8, SAMPLE, CPU) > peak  # and activations grow with the batch


def test_max_batch_is_the_largest_that_fits():
    model = tiny_vit_methods(2)[0].build()
    budget = step_peak_bytes(model, 5, SAMPLE, CPU) + 1
    batch, peak = max_batch(model, SAMPLE, budget, CPU)
    assert peak <= budget and step_peak_bytes(model, batch + 1, SAMPLE, CPU) > budget
    assert batch >= 5


def test_nothing_fits_a_budget_below_the_parameters():
    model = tiny_vit_methods(2)[0].build()
    assert max_batch(model, SAMPLE, 1000, CPU)[0] == 0


def test_reversible_fits_a_larger_batch_than_autograd_in_the_same_budget_and_the_sweep_plots(tmp_path):
    methods = tiny_vit_methods(4)
    autograd = methods[0].build()
    budget = step_peak_bytes(autograd, 8, SAMPLE, CPU)
    rows = budget_table(methods, SAMPLE, budget, CPU, depth=4, steps=1, warmup=0)
    by = {r.label: r for r in rows}
    assert set(by) == {"autograd", "checkpointing", "reversible", "parallel"}
    assert by["autograd"].max_batch == 8
    assert by["reversible"].max_batch > by["checkpointing"].max_batch > by["autograd"].max_batch
    assert all(r.images_per_s > 0 for r in rows)
    plot_depth_sweep(rows + [r.__class__(r.label, 4, r.max_batch, r.peak_bytes, r.images_per_s) for r in rows],
                     str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000
