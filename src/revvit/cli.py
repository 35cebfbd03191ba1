"""The `revvit` command: all argument parsing and error printing, then plain calls into revvit.train,
revvit.bench and revvit.interop. Nothing imports this module.

    revvit train                                  the embedded default: small Rev-ViT on digits, ~1-2 min on CPU
    revvit train --config configs/rev_vit_small.yaml --data /data/imagenet --output runs/s [key=value ...]
    revvit eval --checkpoint runs/s/model.safetensors --data /data/imagenet    (also official .pyth files)
    revvit bench [--family vit|mvit|mvit-video]   memory and step time, reversible vs autograd vs checkpointing
    revvit convert REV_VIT_S.pyth rev_vit_s.safetensors
    torchrun --nproc_per_node 8 -m revvit.cli train --config ...     (or: torchrun ... $(which revvit) train ...)
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import re
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

TRAIN_EPILOG = """\
Any config field can be set as key=value after the options (typed by the field: ints, floats, true/false,
none, [lists], model_kwargs.NAME=VALUE); unknown keys are refused with the list of valid ones. Flags win
over key=value, which wins over the --config file, which wins over the built-in defaults.

Learning rate: lr (and --lr) is given per 512 images of GLOBAL batch and scaled linearly:
the optimiser uses lr * batch_size / 512, batch_size being the sum over all processes.

Without --config: the digits demo for --data digits (the default); for an image folder or video lists, a
general recipe for --model (its own architecture and input size, channels from the data, threads and workers
from the machine, lr 0.016 per 512 with one warmup epoch); with --pretrained, configs/finetune.yaml's recipe.
Every run writes its effective config to OUTPUT/config.yaml (revvit train --config OUTPUT/config.yaml reruns it).

Fine-tuning: --pretrained FILE (official REV_*.pyth, a revvit .safetensors or a revvit .pt checkpoint): the
architecture is the file's unless --model is given; a classifier of another class count is replaced, the
position embeddings are resampled to --img-size, and what did not load is named.

Resume: revvit train --output RUN --resume; the run's config comes from its newest checkpoint that loads (a
corrupt one is named and skipped) and the run continues exactly where it stopped. A flag given with --resume
changes only that setting (--epochs 20 extends the run); another model, data set, input size or batch is refused.
"""


def _os_error(e: OSError) -> str:
    """What a failed file operation means for the user, in one line."""
    where = e.filename if e.filename is not None else "?"
    if e.errno == errno.ENOSPC:
        return f"disk full at {where}: free space on that disk, then run again (revvit train: with --resume)"
    if isinstance(e, PermissionError):
        return f"permission denied: {where}: choose a location you can write, or fix its permissions"
    if isinstance(e, NotADirectoryError):
        return f"{where}: part of the path is a file, not a folder; choose another path"
    if isinstance(e, FileExistsError):
        return f"{where} exists and is not a folder; choose another path"
    if isinstance(e, IsADirectoryError):
        return f"{where} is a folder; give a file"
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"no such file or folder: {where}"
    return str(e) if e.filename is None else f"{e.strerror or e}: {where}"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _worker_message(e: BaseException) -> str:
    """The message of an error, or, when a DataLoader worker re-raised it (its text then is "Caught X in
    DataLoader worker process N." and the worker's traceback), the first line of the original message."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(e).__name__}: "
    tail = text[text.rindex(marker) + len(marker):] if marker in text else text
    return tail.strip().splitlines()[0] if tail.strip() else text.splitlines()[0]


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """Warnings (also in DataLoader workers, which inherit this) as one plain line each, not in Python's format
    (source path, line number, a line of code)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"revvit {command}: warning: {_one_line(str(message))}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _command(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand's handler that prints an error as one line `revvit <cmd>: error: ...` (no traceback) and
    returns 1: the errors a user can fix (bad settings, data, files, a full disk) as their message, anything
    else with its type and a pointer to --debug. With --debug every error propagates with its traceback."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from .data.common import TransformError
        from .io import CheckpointError  # the package is imported only once a command runs: `--help` stays fast
        from .train import ConfigError, TrainError

        command = " ".join(filter(None, [args.command, getattr(args, "detect_command", None)]))
        try:
            with _warnings_as_lines(command) if args.command == "detect" else contextlib.nullcontext():
                return handler(args)
        except KeyboardInterrupt:
            print(f"revvit {command}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if getattr(args, "debug", False):
                raise
            if isinstance(e, OSError):
                text = _os_error(e)
            elif isinstance(e, TransformError):
                text = _worker_message(e)
            elif isinstance(e, (ConfigError, TrainError, CheckpointError, ValueError, FloatingPointError)):
                # revvit's own errors (detection's DetectionConfigError and DetectionDataError are ValueErrors)
                # and the data checks' ValueErrors say what to do
                text = str(e)
            else:
                text = f"{type(e).__name__}: {e} (unexpected: --debug shows the traceback)"
            print(f"revvit {command}: error: {_one_line(text)}", file=sys.stderr)
            return 1

    return run


# -- train ---------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
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
    t.add_argument("--backprop", choices=["reversible", "parallel", "autograd"],
                   help="reversible (default), parallel (reversible with the two-stream CUDA schedule) or autograd")
    t.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp (default: every process holds the whole model) or fsdp (FSDP2: "
                        "parameters, gradients and optimiser state sharded over the processes)")
    t.add_argument("--seed", type=int)
    t.add_argument("--lr", type=float, help="learning rate per 512 images (scaled by batch_size/512)")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --output")
    t.add_argument("--pretrained", help="start from these weights: official .pyth, revvit .safetensors or .pt")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field")
    t.set_defaults(func=_train)


@_command
def _train(args: argparse.Namespace) -> int:
    from .train import fit
    from .train.recipes import train_config

    flags = {"model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
             "img_size": args.img_size, "amp": args.amp, "backprop": args.backprop, "parallel": args.parallel,
             "seed": args.seed, "lr": args.lr, "pretrained": args.pretrained}
    if args.resume and not args.output:
        raise SystemExit("revvit train: --resume needs --output (the run directory to continue)")
    cfg = train_config(args.config, args.overrides + [f"{k}={v}" for k, v in flags.items() if v is not None],
                       Path(args.output) if args.output else None, args.resume)
    if args.output:
        out = Path(args.output)
    else:
        name = Path(args.config).stem if args.config else cfg.data
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fit(cfg, out, resume=args.resume)
    return 0


# -- eval ----------------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a dataset's val split")
    e.add_argument("--checkpoint", required=True, help="a .pt checkpoint or model.safetensors from `revvit train`, "
                   "or any file revvit.load reads (official SlowFast .pyth)")
    e.add_argument("--data", required=True)
    e.add_argument("--batch-size", type=_positive, default=64)
    e.add_argument("--workers", type=_non_negative, default=2, help="DataLoader worker processes (0: none)")
    e.add_argument("--amp", choices=["bf16", "fp16"])
    e.add_argument("--device", default="auto", type=_device, choices=["auto", "cpu", "cuda"])
    e.add_argument("--ignore-class-names", action="store_true",
                   help="evaluate even if the class names stored with the weights differ from the data's")
    e.set_defaults(func=_eval)


@_command
def _eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    _need_file(args.checkpoint)
    m = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.workers, args.device, args.amp,
                            ignore_class_names=args.ignore_class_names)
    line = f"{m['model']} on {args.data} ({m['count']} samples): top-1 {m['top1']:.2f}%"
    if "top5" in m:
        line += f"  top-5 {m['top5']:.2f}%"
    print(line)
    return 0


# -- bench ---------------------------------------------------------------------------------------------
def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths >= 1, e.g. 12,24; got {text!r}")
    return depths


def _at_least(least: int) -> Callable[[str], int]:
    def whole(text: str) -> int:
        if not re.fullmatch(r"[-+]?\d+", text.strip()) or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return int(text)

    return whole


_positive, _non_negative = _at_least(1), _at_least(0)


def _device(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N that this machine has: a missing GPU is refused before any work."""
    from .bench.benchmark import usable_device

    try:
        usable_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _need_file(path: str) -> None:
    """ValueError when --checkpoint `path` is a folder, naming a file in it to give instead."""
    if Path(path).is_dir():
        found = [p for pattern in ("model.safetensors", "*.pt", "checkpoints/*.pt") for p in Path(path).glob(pattern)]
        hint = f"e.g. --checkpoint {found[0]}" if found else "a .pt checkpoint or the model.safetensors of revvit train"
        raise ValueError(f"--checkpoint {path} is a folder: give a file in it, {hint}")


def _writable_file(flag: str, path: Optional[str]) -> Optional[str]:
    """Why results cannot be written to the file `path` (found before anything is measured); None: they can."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        return f"{flag} {path} is a folder: give a file path, e.g. {target / 'results.json'}"
    if not target.parent.is_dir():
        return f"{flag} {path}: no folder {target.parent} (missing, or a file): create it, or choose another path"
    if not os.access(target.parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return f"{flag} {path} is not writable (permission denied): choose a location you can write"
    return None


def _budget(text: str) -> int:
    from .bench.scaling import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="activation memory and step time: reversible vs autograd vs checkpointing")
    b.add_argument("--family", default="vit", choices=["vit", "mvit", "mvit-video", "detection"],
                   help="vit: Rev-ViT vs timm ViT (+checkpointing) at several depths; mvit: Rev-MViT-B vs "
                        "MViT-B; mvit-video: Rev-MViT-B 16x4 vs MViT-B 16x4; detection: Mask R-CNN memory per "
                        "image, Rev-MViT reversible vs autograd vs MViT (--img-size, --batch-size) (default: vit)")
    b.add_argument("--size", default="small", choices=["tiny", "small", "base", "large"],
                   help="ViT size for --family vit (default: small, the paper's Rev-ViT-S)")
    b.add_argument("--depths", type=_depths, default=None,
                   help="comma-separated depths for --family vit, or mvit with --budget (default: 12,24; "
                        "with --budget 12,24,48,96)")
    b.add_argument("--batch-size", type=_positive, default=None, help="default: 4 (vit), 2 (mvit), 1 (mvit-video)")
    b.add_argument("--img-size", type=_positive, default=None, help="default: 224 (112 for mvit-video)")
    b.add_argument("--num-frames", type=_positive, default=8, help="clip length for mvit-video (default: 8)")
    b.add_argument("--steps", type=_positive, default=3, help="timed steps per candidate (median)")
    b.add_argument("--device", default=None, type=_device,
                   help="cpu, cuda or cuda:N (default: auto, cuda if available, else cpu)")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument("--budget", type=_budget, default=None,
                   help="e.g. 16GB: instead of the fixed-batch table, the largest batch that fits this much memory "
                        "(parameters, gradients, AdamW state, activations; measured) per method and depth, "
                        "and images/s at it (--family vit or mvit; --depths, default 12,24,48,96)")
    b.add_argument("--plot", default=None, help="with --budget: write the depth sweep as a PNG plot")
    b.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time the recomputed and non-reversible models with their blocks torch.compiled "
                        "(regional: F and G of reversible blocks; compiled F and G are not fused, so the "
                        "fused rows get no compiled twin); BACKEND default inductor")
    b.set_defaults(func=_bench)


@_command
def _bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_benchmark

    refused = _bench_refusal(args)
    if refused:
        print(f"revvit bench: error: {refused}", file=sys.stderr)
        return 2
    args.device = None if args.device == "auto" else args.device
    if args.family == "detection":  # Mask R-CNN memory: see the detect section
        return _bench_detection(args)
    if args.budget is not None:
        return _bench_budget(args)

    results = run_benchmark(family=args.family, size=args.size, depths=args.depths or [12, 24],
                            batch_size=args.batch_size, img_size=args.img_size, num_frames=args.num_frames,
                            steps=args.steps, device=args.device,
                            log=lambda msg: print(msg, flush=True), compile=args.compile)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0


def _bench_refusal(args: argparse.Namespace) -> Optional[str]:
    """Why these bench options do not go together, or where the results could not be written (None: fine)."""
    if args.plot and args.budget is None:
        return "--plot draws the --budget depth sweep: give --budget too (e.g. --budget 16GB)"
    if args.family == "detection":
        given = [flag for flag, value in (("--budget", args.budget), ("--plot", args.plot), ("--depths", args.depths))
                 if value is not None]
        if given:
            return f"--family detection measures one Mask R-CNN per backbone: {', '.join(given)} do not apply"
    if args.compile and (args.budget is not None or args.family == "detection"):
        return "--compile applies to the fixed-batch comparison (--family vit, mvit, mvit-video without --budget)"
    if args.budget is not None and args.family not in ("vit", "mvit"):
        return f"--budget compares image models: use --family vit or mvit, not {args.family}"
    if args.depths is not None and not (args.family == "vit" or (args.family == "mvit" and args.budget is not None)):
        return f"--depths applies to --family vit (and mvit with --budget), not {args.family}"
    return _writable_file("--json", args.json) or _writable_file("--plot", args.plot)


def _bench_budget(args: argparse.Namespace) -> int:
    import torch

    from .bench.scaling import budget_sweep, format_budget_table, plot_depth_sweep

    depths = args.depths or [12, 24, 48, 96]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = budget_sweep(args.family, args.size, depths, args.img_size or 224, args.budget, device, args.steps,
                        log=lambda msg: print(msg, flush=True))
    print(format_budget_table(rows, args.budget, device))
    if args.plot:
        plot_depth_sweep(rows, args.plot, title=f"{args.family} {args.size}, budget {args.budget / 2**30:.1f} GiB")
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
    return 0


# -- convert -------------------------------------------------------------------------------------------
def add_convert_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert an official SlowFast checkpoint (.pyth) to .safetensors",
                       description="Load an official Rev-ViT / Rev-MViT checkpoint exactly and write revvit "
                                   "weights plus metadata (model name and kwargs) as .safetensors.")
    p.add_argument("src", help="official checkpoint, e.g. REV_VIT_S.pyth")
    p.add_argument("dst", help="output file, ending in .safetensors")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run_convert)
    return p


@_command
def run_convert(args: argparse.Namespace) -> int:
    from .interop import convert, model_spec

    model = convert(args.src, args.dst, overwrite=args.force)
    name, kwargs = model_spec(model)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {type(model).__name__} ({n / 1e6:.1f}M parameters, {kwargs['num_classes']} classes), "
          f"timm name {name}")
    return 0


# -- detect --------------------------------------------------------------------------------------------
DETECT_EPILOG = """\
Without --data: builds the digits COCO set under OUT/digits_coco and trains a tiny Rev-MViT Mask R-CNN
(a few minutes on 2 CPU cores), then prints COCO box and mask AP. Any DetectionConfig field can be set as
key=value after the options (YAML-typed; backbone_kwargs.NAME=VALUE sets one backbone option); flags win
over key=value, which wins over --config (configs/detection/*.yaml), which wins over the defaults.
--batch-size is the global batch (all torchrun processes together); max_iters=N sets the run's length in
iterations instead of --epochs. Settings are checked before anything is written; a start that fails before its
first checkpoint removes what it created. --resume continues exactly from the newest good checkpoint in --output
with the run's own settings: give only what changes (--epochs 12 extends the run); another data set, batch or
detector is refused. Without --resume, an --output holding checkpoints or a model.safetensors is refused.
"""


def _add_detect(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("detect", help="Mask R-CNN on Rev-MViT / MViT / Rev-ViT backbones: COCO in, COCO AP out")
    dsub = d.add_subparsers(dest="detect_command", required=True)
    t = dsub.add_parser("train", help="train a detector (no --data: the digits COCO demo)", epilog=DETECT_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--backbone", help="revvit timm model, e.g. rev_mvit_base, mvit_base, rev_vit_base_patch16_224")
    t.add_argument("--data", help="COCO 2017 layout: DIR/{train,val}2017/, DIR/annotations/instances_*2017.json")
    t.add_argument("--output", required=True, help="run directory")
    t.add_argument("--config", help="YAML recipe, e.g. configs/detection/rev_mvit_b_mask_rcnn.yaml")
    t.add_argument("--epochs", type=_positive)
    t.add_argument("--batch-size", type=_positive, help="global batch size")
    t.add_argument("--img-size", type=_positive, help="training and evaluation resolution (longer image side)")
    t.add_argument("--pretrained", help="classification checkpoint for the backbone (.pyth or revvit .safetensors)")
    t.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision via torch.autocast")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --output, "
                   "with the run's own settings (give only what changes)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any DetectionConfig field")
    t.set_defaults(func=_detect_train)
    e = dsub.add_parser("eval", help="COCO bbox/segm AP of a detector on DIR's val2017")
    e.add_argument("--checkpoint", required=True, help="model.safetensors (or a checkpoint .pt) of detect train")
    e.add_argument("--data", required=True, help="COCO 2017 layout (val2017 and its annotation file are used)")
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--amp", choices=["bf16", "fp16"])
    e.add_argument("--device", default="auto", type=_device, choices=["auto", "cpu", "cuda"])
    e.set_defaults(func=_detect_eval)


@_command
def _detect_train(args: argparse.Namespace) -> int:
    from .detection.config import detection_config
    from .detection.train import run_config, train_detector

    flags = {"backbone": args.backbone, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
             "pretrained": args.pretrained, "amp": args.amp, "img_size": args.img_size}
    base = run_config(args.output) if args.resume else None  # the run's own settings; what is given changes them
    cfg = detection_config(args.config, args.overrides, flags, base)
    train_detector(cfg, args.output, resume=args.resume, log=lambda msg: print(msg, flush=True))
    return 0


@_command
def _detect_eval(args: argparse.Namespace) -> int:
    from .detection.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.device, args.amp,
                                 log=lambda msg: print(msg, flush=True))
    print(result.summary)
    print(result.ap_line())
    return 0


def _bench_detection(args: argparse.Namespace) -> int:
    """`revvit bench --family detection [--img-size N] [--batch-size N] [--device D] [--json F]`."""
    from .bench.detection import detection_memory, format_detection_table
    from .detection import create_detector

    def build(name: str, mode: str):
        size = args.img_size or 512
        return create_detector(name, 81, min_size=size, max_size=size, backprop=mode)  # COCO: 80 classes

    rows = detection_memory(build, args.img_size or 512, args.batch_size or 1, args.device,
                            log=lambda msg: print(msg, flush=True))
    print(format_detection_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revvit", description="Reversible Vision Transformers: train and evaluate.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (may stand anywhere)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_bench(sub)
    add_convert_parser(sub)
    _add_detect(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # key=value overrides may stand anywhere after `train` (and `detect train`); argparse alone would only take
    # them before the flags
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
