"""The training loop. `fit(cfg, out_dir)` reads top to bottom:

    setup (device, process group, seeds, data, model, optimiser, schedule, AMP, EMA, loss) into one Run
    -> resume from the newest good checkpoint -> per epoch: train_one_epoch, end_epoch (evaluate, checkpoint)
    -> finish: final weights (model.safetensors), summary, and optionally the activation-memory table.

Global batch = cfg.batch_size, split evenly over processes. Each epoch's sample order is a function of
(seed, epoch) (DistributedSampler, also with one process), so the global batch is the same with 1 or N
processes and a run resumed mid-epoch restarts the same order at the first unconsumed batch.
"""
from __future__ import annotations

import json
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import interop
from ..bench.memory import memory_table
from ..data import DataBundle, build_datasets
from ..data import common as data_common
from ..io import atomic_write, folder_before
from . import checkpoint as ckpt
from .config import TrainConfig, save_config
from .distributed import DistInfo, SkipSampler, all_reduce_sum, init_distributed, shutdown
from .evaluate import eval_loader, evaluate
from .finetune import build_finetune_optimizer, load_pretrained
from .logger import RunLogger
from .optim import build_scheduler
from .parts import AMP_DTYPES, TrainError, TrainingDiverged, create_run_model, data_spec, mixup_fn, train_sampler
from .recipes import SCHEDULE_KEYS, check_resume, describe_run
from .sharding import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    keyed_by_name,
    load_full_model_state,
    load_full_optimizer_state,
    local_value,
    shard_model,
)

__all__ = ["fit", "Run", "RunState"]

UNREADABLE = "unreadable.txt"  # one line per file skipped at load time (appended by every DataLoader worker)


@dataclass
class RunState:
    """Where the run is: the next batch to train is batch `batches_done` of epoch `epoch`."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    history: list = field(default_factory=list)
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])  # [sum, steps] of the current epoch
    skipped_in_a_row: int = 0  # optimiser steps skipped for non-finite gradients (not checkpointed)


@dataclass
class Run:
    """Everything one training run works with, built by `setup`; every step of `fit` takes it."""

    cfg: TrainConfig
    out_dir: Path
    d: DistInfo
    data: DataBundle
    model: nn.Module  # the bare model: its weights are checkpointed and evaluated
    model_kwargs: dict  # what create_run_model built it with: recorded to rebuild it
    ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler  # stepped per optimiser step (step_update)
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mix: Optional[Callable]
    sampler: Any  # DistributedSampler, or timm's RepeatAugSampler
    per_rank: int  # batch per process
    steps_per_epoch: int
    t_start: float
    state: RunState = field(default_factory=RunState)
    net: Optional[nn.Module] = None  # what the step calls: `model`, or DDP over it (after resume)
    logger: Optional[RunLogger] = None
    val_loader: Optional[DataLoader] = None
    config_due: bool = False  # resumed: config.yaml is rewritten once the run has saved a checkpoint

    def say(self, msg: str) -> None:
        if self.d.is_main:
            tqdm.write(msg)


def memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GB"
    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GB"  # ru_maxrss: KiB


# -- the steps of fit ----------------------------------------------------------------------------------
def setup(cfg: TrainConfig, out_dir: Path, d: DistInfo, resume: bool, t_start: float) -> Run:
    """Check the settings, then build data, model, optimiser, schedule, scaler, EMA, mixup and loss."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.batch_size % d.world_size:
        raise TrainError(f"batch_size {cfg.batch_size} (global) is not divisible by {d.world_size} processes")
    per_rank = cfg.batch_size // d.world_size
    if (cfg.mixup > 0 or cfg.cutmix > 0) and per_rank % 2:
        raise TrainError(f"mixup/cutmix need an even batch per process, got {per_rank}")
    if cfg.parallel == "fsdp" and d.enabled and cfg.ema:
        raise TrainError("parallel=fsdp does not support ema=true yet (the average needs the whole model on one "
                         "process): use parallel=ddp, or ema=false")
    existing, continuing = ckpt.run_files(out_dir), resume and ckpt.resumable(out_dir)
    if existing and not continuing:  # every rank checks, so all stop together; nothing of a run is overwritten
        held = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise TrainError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                         "another --output" if ckpt.resumable(out_dir) else
                         f"{out_dir} holds a run's files ({held}) but no checkpoint to resume from: choose another "
                         f"--output (to start from its weights: --pretrained {out_dir / ckpt.WEIGHTS})")
    ckpt.check_output_dir(out_dir)  # the folder is created once data and model are known to be good
    say = tqdm.write if d.is_main else (lambda msg: None)

    random_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_common.SkippedFiles)  # said once, below
        data = build_datasets(data_spec(cfg))
    for split in (data.train, data.val):  # files that fail to decode during the run, from every worker
        if hasattr(split, "record"):
            split.record = str(out_dir / UNREADABLE)
    if data.skipped:
        say(f"skipped {len(data.skipped)} unreadable file(s): {', '.join(data.skipped[:5])}"
            + (" ..." if len(data.skipped) > 5 else ""))
    if data.unchecked and cfg.verify_data is None:
        splits = " and ".join(f"{n:,} {split}" for split, n in data.unchecked.items())
        say(f"not opening the {splits} files up front (more than {data_common.VERIFY_MAX_FILES:,} in a split; "
            "verify_data=true forces it): an unreadable file is skipped, with a warning, when it is loaded")
    model, model_kwargs = create_run_model(cfg, data.num_classes, data.img_size, data.in_chans,
                                           data.num_frames if data.kind == "video" else None)
    if cfg.pretrained and not continuing:  # a resumed run has its own weights
        load_pretrained(model, cfg.pretrained, log=say)
    data.train = data_common.EpochSeeded(data.train, cfg.seed)  # augmentation independent of the workers
    sampler = train_sampler(cfg, data.train, d)
    steps_per_epoch = len(sampler) // per_rank
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch < 1:  # before the folder exists: a failed start leaves nothing behind
        raise TrainError(f"{len(data.train)} training samples give no full batch of {per_rank} per process: "
                         "lower --batch-size")
    if d.is_main:
        ckpt.prepare_output_dir(out_dir, say)
    model.to(d.device)
    if cfg.parallel == "fsdp" and d.enabled:
        shard_model(model)  # before the optimiser, which then holds (and keeps state for) the shards
    elif cfg.parallel == "fsdp":
        say("parallel=fsdp: one process, nothing to shard (start under torchrun to shard over processes)")
    say(describe_run(cfg, data, sum(p.numel() for p in model.parameters()), str(d.device), d.world_size, out_dir))
    if d.is_main and not continuing:  # a resumed run's config.yaml changes with its first new checkpoint
        save_config(cfg, out_dir / ckpt.CONFIG)

    optimizer = build_finetune_optimizer(model, cfg)
    mix = mixup_fn(cfg, data.num_classes)
    return Run(cfg=cfg, out_dir=out_dir, d=d, data=data, model=model, model_kwargs=model_kwargs,
               ema=ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None, optimizer=optimizer,
               scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
               scaler=torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16"),
               criterion=SoftTargetCrossEntropy() if mix is not None
               else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
               mix=mix, sampler=sampler, per_rank=per_rank, steps_per_epoch=steps_per_epoch, t_start=t_start,
               config_due=continuing)


def resume_or_seed(run: Run, resume: bool) -> None:
    """Continue from the newest checkpoint that loads (every state, RNGs included), or seed a fresh run."""
    if not resume:
        random_seed(run.cfg.seed, run.d.rank)  # per-rank augmentation and drop-path draws
        return
    found = ckpt.load_latest(run.out_dir, log=run.say)
    if found is None:
        run.say(f"no checkpoint in {run.out_dir}: starting from scratch")
        random_seed(run.cfg.seed, run.d.rank)  # as a fresh run
        return
    path, state = found
    changed = check_resume(state["config"], run.cfg, run.out_dir)  # refuses another model, data, input, batch
    sharded = is_sharded(run.model)
    ckpt.load_model_state(run.model, state, path, run.cfg.model, run.model_kwargs,
                          load_full_model_state if sharded else None)
    if sharded or keyed_by_name(state["optimizer"]):
        load_full_optimizer_state(run.model, run.optimizer, state["optimizer"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    if set(changed) & set(SCHEDULE_KEYS):  # e.g. more epochs: the new schedule, at the step reached
        run.scheduler.step_update(state["global_step"])
    else:
        run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    run.state = RunState(state["epoch"], state["batches_done"], state["global_step"], state["best_top1"],
                         list(state["history"]), list(state["epoch_loss"]))
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[run.d.rank] if len(rngs) == run.d.world_size else rngs[0])
    run.say(f"resumed from {path} (epoch {run.state.epoch + 1}, batch {run.state.batches_done}, "
            f"step {run.state.global_step})")


def connect(run: Run, resume: bool) -> None:
    """What needs the run's position: DDP over the model, the logger (a resumed run's events purged past the
    checkpoint), the val loader."""
    d = run.d
    run.net = run.model
    if d.enabled and not is_sharded(run.model):
        run.net = DistributedDataParallel(run.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    run.logger = RunLogger(run.out_dir, enabled=d.is_main, purge_step=run.state.global_step if resume else None)
    run.val_loader = eval_loader(run.data.val, run.per_rank, run.cfg.num_workers, d)


def save_checkpoint(run: Run, is_best: bool = False) -> None:
    """ckpt_<step>.pt (and best.pt) with every state and every rank's RNGs; written by rank 0. If rank 0
    cannot write it (full disk, non-finite weights), every rank stops, not only rank 0."""
    d, st = run.d, run.state
    rngs = [ckpt.rng_state()]
    if d.enabled:
        rngs = [None] * d.world_size
        torch.distributed.all_gather_object(rngs, ckpt.rng_state())
    sharded = is_sharded(run.model)  # the full states are gathered to rank 0 (every rank takes part)
    model_state = full_model_state(run.model) if sharded else None
    optimizer_state = full_optimizer_state(run.model, run.optimizer) if sharded else None
    failure = None
    if d.is_main:
        state = dict(model=model_state if sharded else run.model.state_dict(), model_name=run.cfg.model,
                     model_kwargs=run.model_kwargs,
                     optimizer=optimizer_state if sharded else run.optimizer.state_dict(),
                     scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(),
                     ema=run.ema.state_dict() if run.ema is not None else None, epoch=st.epoch,
                     batches_done=st.batches_done, global_step=st.global_step, best_top1=st.best_top1,
                     history=st.history, epoch_loss=st.epoch_loss, config=run.cfg.to_dict(), rng=rngs,
                     class_names=list(run.data.class_names), world_size=d.world_size)
        try:
            ckpt.save_checkpoint(state, run.out_dir, st.global_step, run.cfg.keep_last, is_best)
        except Exception as e:  # noqa: BLE001 - said to the other ranks, then raised as it was
            failure = e
    if d.enabled and all_reduce_sum([float(failure is not None)], d.device)[0] and failure is None:
        raise TrainError(f"rank 0 could not write the checkpoint of step {st.global_step} (its message says why); "
                         "every process stops")
    if failure is not None:
        raise failure
    if d.is_main and run.config_due:  # the resumed run's settings now describe a checkpoint: rerun with them
        save_config(run.cfg, run.out_dir / ckpt.CONFIG)
        run.config_due = False


def epoch_loader(run: Run, generator: torch.Generator) -> DataLoader:
    """This epoch's batches from the first one not yet trained: the order and the worker seeds are functions
    of (seed, epoch)."""
    cfg, st = run.cfg, run.state
    run.sampler.set_epoch(st.epoch if cfg.repeated_aug == 1 else st.epoch + 100_000 * cfg.seed)
    generator.manual_seed(cfg.seed * 1_000_003 + st.epoch)
    run.data.train.set_epoch(st.epoch)
    skip = st.batches_done * run.per_rank
    sampler = data_common.KeyedSampler(SkipSampler(run.sampler, skip), skip, run.d.rank, run.d.world_size)
    return DataLoader(run.data.train, batch_size=run.per_rank, sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=run.d.device.type == "cuda", drop_last=True, generator=generator,
                      persistent_workers=False)


def train_one_epoch(run: Run, loader: DataLoader) -> None:
    cfg, st, d = run.cfg, run.state, run.d
    run.net.train()
    amp_dtype = AMP_DTYPES[cfg.amp]
    bar = tqdm(total=run.steps_per_epoch, initial=st.batches_done, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
               disable=not (d.is_main and cfg.progress), dynamic_ncols=True, leave=True)
    t0, seen, smooth = time.perf_counter(), 0, None
    for x, y in (loader if st.batches_done < run.steps_per_epoch else []):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if run.mix is not None:
            x, y = run.mix(x, y)
        with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = run.criterion(run.net(x), y)

        # Stop before the update on a non-finite loss (all ranks agree: the mean is NaN if any is).
        # .item() and the all-reduce: one host sync per step.
        loss_value = all_reduce_sum([loss.item()], d.device)[0] / d.world_size
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(
                f"loss is {loss_value} at step {st.global_step + 1} (epoch {st.epoch + 1}); training stopped, "
                f"no checkpoint written for this step (the last good one is kept). Try a lower lr "
                f"(now {cfg.lr} per 512 images), --amp bf16 instead of fp16, or gradient clipping (clip_grad=1.0).")

        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        if finite_gradients(run):
            run.scaler.step(run.optimizer)
        run.scaler.update()
        st.global_step += 1
        run.scheduler.step_update(st.global_step)
        if run.ema is not None:
            run.ema.update(run.model, step=st.global_step - 1)

        st.batches_done += 1
        st.epoch_loss[0] += loss_value
        st.epoch_loss[1] += 1
        seen += cfg.batch_size
        smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
        lr = run.optimizer.param_groups[0]["lr"]
        if d.is_main:
            run.logger.step(st.global_step, loss_value, lr)
            bar.update(1)
            if st.batches_done % 5 == 0 or st.batches_done == run.steps_per_epoch:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"loss {smooth:.4f} lr {lr:.2e} {rate:.0f} img/s mem {memory_text(d.device)}",
                                    refresh=False)
        if cfg.ckpt_every_steps and st.global_step % cfg.ckpt_every_steps == 0:
            save_checkpoint(run)
        if st.batches_done >= run.steps_per_epoch:
            break  # before the loader reads (and augments) a batch this epoch will not use
    bar.close()


MAX_SKIPPED_STEPS = 3  # consecutive optimiser steps skipped for non-finite gradients before the run stops


def finite_gradients(run: Run) -> bool:
    """False (the update is skipped, with a warning) when a gradient is NaN/inf; TrainingDiverged after
    MAX_SKIPPED_STEPS such steps in a row. Under fp16 the GradScaler does this itself (and lowers its scale).
    DDP has averaged the gradients, so every rank decides the same. Costs a host sync (.item())."""
    if run.scaler.is_enabled():
        return True
    norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    if math.isfinite(local_value(norm).item()):
        run.state.skipped_in_a_row = 0
        return True
    run.state.skipped_in_a_row += 1
    step = run.state.global_step + 1
    if run.state.skipped_in_a_row >= MAX_SKIPPED_STEPS:
        raise TrainingDiverged(f"gradients are not finite at {MAX_SKIPPED_STEPS} steps in a row (up to step {step}); "
                               f"training stopped, the last good checkpoint is kept. Try a lower lr (now {run.cfg.lr} "
                               "per 512 images) or gradient clipping (clip_grad=1.0).")
    run.say(f"warning: non-finite gradients at step {step}: update skipped")
    return False


def end_epoch(run: Run) -> None:
    """Evaluate (every eval_every epochs and at the end), record the epoch, move to the next, checkpoint."""
    cfg, st, d = run.cfg, run.state, run.d
    row = {"epoch": st.epoch + 1, "step": st.global_step, "train_loss": st.epoch_loss[0] / max(st.epoch_loss[1], 1),
           "lr": run.optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - run.t_start, 2)}
    is_best = False
    if (st.epoch + 1) % cfg.eval_every == 0 or st.epoch + 1 == cfg.epochs:
        metrics = evaluate(run.model, run.val_loader, d.device, cfg.amp, lockstep=is_sharded(run.model))
        row.update({f"val_{k}": v for k, v in metrics.items() if k != "count"})
        if run.ema is not None:
            row["val_top1_ema"] = evaluate(run.ema.module, run.val_loader, d.device, cfg.amp)["top1"]
        is_best = metrics["top1"] > st.best_top1
        st.best_top1 = max(st.best_top1, metrics["top1"])
        run.say(f"epoch {st.epoch + 1}: train loss {row['train_loss']:.4f}, val top-1 {metrics['top1']:.2f}%"
                + (f", top-5 {metrics['top5']:.2f}%" if "top5" in metrics else "")
                + f", val loss {metrics['loss']:.4f}")
    st.history.append(row)
    st.epoch, st.batches_done, st.epoch_loss = st.epoch + 1, 0, [0.0, 0]
    if d.is_main:
        run.logger.epoch(st.history)
    save_checkpoint(run, is_best)


def finish(run: Run) -> dict:
    """Rank 0: model.safetensors (and model_ema.safetensors), summary.json, the memory table."""
    weights = full_model_state(run.model) if is_sharded(run.model) else None  # every rank takes part
    if not run.d.is_main:
        return {}
    cfg, st = run.cfg, run.state
    extra = {"config": cfg.to_dict(), "class_names": list(run.data.class_names)}
    interop.save(run.model, run.out_dir / ckpt.WEIGHTS, extra, model_name=cfg.model, model_kwargs=run.model_kwargs,
                 state_dict=weights)
    if run.ema is not None:
        interop.save(run.ema.module, run.out_dir / ckpt.EMA_WEIGHTS, extra, model_name=cfg.model,
                     model_kwargs=run.model_kwargs)
    final = st.history[-1]
    summary = {"model": cfg.model, "params": sum(p.numel() for p in run.model.parameters()),
               "backprop": cfg.backprop, "epochs": cfg.epochs, "steps": st.global_step,
               "val_top1": final.get("val_top1"), "val_top5": final.get("val_top5"), "best_top1": st.best_top1,
               "wall_time_s": round(time.perf_counter() - run.t_start, 1), "skipped_files": skipped_files(run),
               "output": str(run.out_dir)}
    summary["skipped_count"] = len(summary["skipped_files"])
    if cfg.memory_table and is_sharded(run.model):
        run.say("memory table skipped: it measures the whole model in one process (run it without parallel=fsdp)")
    elif cfg.memory_table:
        summary["memory"] = memory_table(run.model, run.data.train, run.d.device, run.say)
    summary["wall_time_s"] = round(time.perf_counter() - run.t_start, 1)
    atomic_write(run.out_dir / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    run.say(format_summary(summary))
    return summary


def skipped_files(run: Run) -> list[str]:
    """The unreadable files: dropped up front, then those skipped when loaded (recorded by every worker)."""
    record = run.out_dir / UNREADABLE
    at_load = record.read_text().split("\n") if record.is_file() else []
    return list(dict.fromkeys(list(run.data.skipped) + [p for p in at_load if p]))


def format_summary(s: dict) -> str:
    top5 = f", top-5 {s['val_top5']:.2f}%" if s.get("val_top5") is not None else ""
    return (f"\ndone: {s['model']} ({s['params'] / 1e6:.2f}M params, {s['backprop']} backprop), {s['epochs']} epochs / "
            f"{s['steps']} steps in {s['wall_time_s']:.1f}s\n"
            f"  val top-1 {s['val_top1']:.2f}%{top5} (best {s['best_top1']:.2f}%)\n"
            f"  outputs in {s['output']}: model.safetensors, checkpoints, metrics.json/.csv, curves.png, tensorboard/")


# -- the run ---------------------------------------------------------------------------------------------
def fit(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` into `out_dir`; returns the summary (also written as summary.json; {} on ranks > 0)."""
    t_start = time.perf_counter()
    d = init_distributed(cfg.device)
    saved_threads, saved_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    run, before = None, folder_before(out_dir)
    try:
        run = setup(cfg, Path(out_dir), d, resume, t_start)
        resume_or_seed(run, resume)
        connect(run, resume)
        loader_gen = torch.Generator()
        while run.state.epoch < cfg.epochs:
            train_one_epoch(run, epoch_loader(run, loader_gen))
            end_epoch(run)
        run.logger.close()  # before the summary is printed; closing again below is harmless
        return finish(run)
    except BaseException:
        if run is not None and run.logger is not None:
            run.logger.close()  # flushed also after a stop (divergence, Ctrl-C); before any file is removed
        removed = ckpt.remove_failed_start(Path(out_dir), before) if d.is_main else []
        if removed:
            log(f"no checkpoint was written: removed what this run created in {out_dir} ({', '.join(removed)})")
        raise
    finally:
        if run is not None and run.logger is not None:
            run.logger.close()  # closing twice is harmless
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det)
        shutdown()
