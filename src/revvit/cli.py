"""The `revvit` command. Parses arguments, then calls revvit.train; nothing imports this module.

    revvit train                                  the embedded default: small Rev-ViT on digits, ~1-2 min on CPU
    revvit train --config configs/rev_vit_small.yaml --data /data/imagenet --output runs/s [key=value ...]
    revvit eval --checkpoint runs/s/model.safetensors --data /data/imagenet    (also official .pyth files)
    revvit bench [--family vit|mvit|mvit-video]   memory and step time, reversible vs autograd vs checkpointing
    revvit convert REV_VIT_S.pyth rev_vit_s.safetensors
    torchrun --nproc_per_node 8 -m revvit.cli train --config ...     (or: torchrun ... $(which revvit) train ...)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

TRAIN_EPILOG = """\
Any config field can be set as key=value after the options (typed by the field: ints, floats, true/false,
none, [lists], model_kwargs.NAME=VALUE); unknown keys are refused with the list of valid ones. Flags win
over key=value, which wins over the --config file, which wins over the built-in defaults.

Learning rate: lr (and --lr) is given per 512 images of GLOBAL batch and scaled linearly:
the optimiser uses lr * batch_size / 512, batch_size being the sum over all processes.

Resume: rerun the same command with --resume; the newest checkpoint in --output that loads is used
(a corrupt one is named and skipped) and the run continues exactly where it stopped.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revvit", description="Reversible Vision Transformers: train and evaluate.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no arguments: the digits demo)", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML recipe (configs/*.yaml); default: the built-in digits demo")
    t.add_argument("--model", help="timm model name, e.g. rev_vit_small_patch16_224")
    t.add_argument("--data", help='"digits", "digits-video", an image folder with train/ val/, or video lists')
    t.add_argument("--output", help="run directory (default runs/<config>-<time>)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size (all processes together)")
    t.add_argument("--img-size", type=int)
    t.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision via torch.autocast")
    t.add_argument("--backprop", choices=["reversible", "autograd"])
    t.add_argument("--seed", type=int)
    t.add_argument("--lr", type=float, help="learning rate per 512 images (scaled by batch_size/512)")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --output")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field")

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a dataset's val split")
    e.add_argument("--checkpoint", required=True, help="a .pt checkpoint or model.safetensors from `revvit train`, "
                   "or any file revvit.load reads (official SlowFast .pyth)")
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--amp", choices=["bf16", "fp16"])
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    from .bench.benchmark import add_arguments as add_bench_arguments
    from .interop import add_convert_subcommand

    b = sub.add_parser("bench", help="activation memory and step time: reversible vs autograd vs checkpointing")
    add_bench_arguments(b)
    add_convert_subcommand(sub)
    return p


def _train(args) -> int:
    from .train import apply_overrides, fit, load_config

    flags = {"model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
             "img_size": args.img_size, "amp": args.amp, "backprop": args.backprop, "seed": args.seed, "lr": args.lr}
    cfg = apply_overrides(load_config(args.config, data=args.data),
                          args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None])
    if args.output:
        out = Path(args.output)
    elif args.resume:
        raise SystemExit("revvit train: --resume needs --output (the run directory to continue)")
    else:
        name = Path(args.config).stem if args.config else cfg.data
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fit(cfg, out, resume=args.resume)
    return 0


def _eval(args) -> int:
    from .train import evaluate_checkpoint

    m = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.workers, args.device, args.amp)
    line = f"{m['model']} on {args.data} ({m['count']} samples): top-1 {m['top1']:.2f}%"
    if "top5" in m:
        line += f"  top-5 {m['top5']:.2f}%"
    print(line)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    # key=value overrides may stand anywhere after `train`; argparse alone would only take them before the flags
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench":
        from .bench.benchmark import main as bench

        bench(args)
        return 0
    if args.command == "convert":
        return args.func(args)
    from .interop import CheckpointError as InteropError
    from .train import ConfigError, TrainError
    from .train.checkpoint import CheckpointError

    try:
        return {"train": _train, "eval": _eval}[args.command](args)
    except (ConfigError, TrainError, CheckpointError, InteropError, FileNotFoundError) as e:
        print(f"revvit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"revvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
