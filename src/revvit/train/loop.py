"""The training loop. `fit(cfg, out_dir)` reads top to bottom:

    setup (device, process group, seeds) -> data -> model -> optimiser, schedule, AMP, EMA
    -> resume from the newest good checkpoint -> per epoch: train_one_epoch, evaluate, checkpoint
    -> final weights (model.safetensors), summary, and optionally the activation-memory table.

Global batch = cfg.batch_size, split evenly over processes. Each epoch's sample order is a function of
(seed, epoch) (DistributedSampler, also with one process), so the global batch is the same with 1 or N
processes and a run resumed mid-epoch restarts the same order at the first unconsumed batch.
"""
from __future__ import annotations

import copy
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistInfo, ShardSampler, SkipSampler, all_reduce_sum, init_distributed, shutdown
from .logger import RunLogger
from .optim import build_optimizer, build_scheduler

__all__ = ["fit", "evaluate", "build_model", "data_spec", "TrainingDiverged", "TrainError", "evaluate_checkpoint"]

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to change."""


class TrainingDiverged(TrainError):
    pass


# -- building blocks ---------------------------------------------------------------------------------
def known_models() -> list[str]:
    import revvit  # noqa: F401  (registers the revvit models)

    return timm.list_models(["rev_*", "mvit_*"])


def build_model(cfg: TrainConfig, num_classes: int, img_size: int, in_chans: int,
                num_frames: Optional[int] = None) -> tuple[nn.Module, dict]:
    """timm.create_model with the data's classes/size/channels; returns (model, the kwargs used)."""
    import revvit  # noqa: F401

    if cfg.model not in timm.list_models():
        raise TrainError(f"unknown model {cfg.model!r}. revvit models: {', '.join(known_models())} "
                         f"(timm has {len(timm.list_models())} others: timm.list_models())")
    kwargs = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, drop_path_rate=cfg.drop_path)
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    kwargs.update(cfg.model_kwargs)
    try:
        model = timm.create_model(cfg.model, **kwargs)
    except TypeError as e:
        raise TrainError(f"cannot build {cfg.model} with {kwargs}: {e}") from None
    if hasattr(model, "set_backprop"):
        model.set_backprop(cfg.backprop)
    return model, kwargs


def data_spec(cfg: TrainConfig, path: Optional[str] = None, model_name: Optional[str] = None):
    """The data settings of `cfg`, normalised with the model's own mean/std (timm's pretrained_cfg:
    ImageNet statistics for images, 0.45/0.225 for the Kinetics models)."""
    from ..data import DataSpec

    norm = {}
    pretrained = timm.models.get_pretrained_cfg(model_name or cfg.model)
    if pretrained is not None and pretrained.mean is not None:
        norm = dict(mean=tuple(pretrained.mean), std=tuple(pretrained.std))
    return DataSpec(path=path or cfg.data, img_size=cfg.img_size, in_chans=cfg.in_chans, num_frames=cfg.num_frames,
                    sampling_rate=cfg.sampling_rate, train_aug=cfg.train_aug, auto_augment=cfg.auto_augment,
                    reprob=cfg.reprob, test_clips=cfg.test_clips, test_crops=cfg.test_crops, verify=cfg.verify_data,
                    **norm)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GB"
    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GB"  # ru_maxrss: KiB


def train_sampler(cfg: TrainConfig, dataset, d: DistInfo):
    if cfg.repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=d.world_size, rank=d.rank, num_repeats=cfg.repeated_aug)
    return DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=cfg.seed,
                              drop_last=True)


def mixup_fn(cfg: TrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                num_classes=num_classes)

    def apply(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 5:  # video (B, C, T, H, W): timm cuts boxes in the last two dims of 4-D input
            b, c, t, h, w = x.shape
            x, y = mix(x.reshape(b, c * t, h, w), y)
            return x.reshape(b, c, t, h, w), y
        return mix(x, y)

    return apply


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: Optional[str] = None) -> dict:
    """Top-1/top-5 (%) and mean cross-entropy over the loader, summed over all ranks. A batch of
    (B, V, C, T, H, W) video views is scored by the mean softmax over its V views."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    num_classes = None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        views = 1
        if x.dim() == 6:
            views = x.shape[1]
            x = x.flatten(0, 1)
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp is not None):
            logits = model(x)
        probs = logits.float().softmax(-1)
        probs = probs.view(-1, views, probs.shape[-1]).mean(1)
        num_classes = probs.shape[-1]
        top = probs.topk(min(5, num_classes), dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
        loss_sum += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()
        count += y.numel()
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], device)
    model.train(was_training)
    count = max(count, 1)
    out = {"top1": 100 * correct1 / count, "loss": loss_sum / count, "count": int(count)}
    if num_classes is not None and num_classes >= 5:
        out["top5"] = 100 * correct5 / count
    return out


def eval_loader(dataset, batch_size: int, num_workers: int, d: DistInfo) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), d.rank, d.world_size),
                      num_workers=num_workers, pin_memory=d.device.type == "cuda")


# -- training ----------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Where the run is: the next batch to train is batch `batches_done` of epoch `epoch`."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    history: list = field(default_factory=list)
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])  # [sum, steps] of the current epoch


def train_one_epoch(model, ema, loader, optimizer, scheduler, scaler, criterion, mix, cfg: TrainConfig,
                    st: RunState, steps_per_epoch: int, d: DistInfo, on_step: Callable[[], None], logger: RunLogger):
    model.train()
    amp_dtype = AMP_DTYPES[cfg.amp]
    global_batch = cfg.batch_size
    bar = tqdm(total=steps_per_epoch, initial=st.batches_done, desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
               disable=not (d.is_main and cfg.progress), dynamic_ncols=True, leave=True)
    t0, seen, smooth = time.perf_counter(), 0, None
    for x, y in (loader if st.batches_done < steps_per_epoch else []):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if mix is not None:
            x, y = mix(x, y)
        with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(x), y)

        # Stop before the update on a non-finite loss (all ranks agree: the mean is NaN if any is).
        loss_value = all_reduce_sum([loss.item()], d.device)[0] / d.world_size
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(
                f"loss is {loss_value} at step {st.global_step + 1} (epoch {st.epoch + 1}); training stopped, "
                f"no checkpoint written for this step (the last good one is kept). Try a lower lr "
                f"(now {cfg.lr} per 512 images), --amp bf16 instead of fp16, or gradient clipping (clip_grad=1.0).")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model.module if isinstance(model, DistributedDataParallel) else model, step=st.global_step)

        st.global_step += 1
        st.batches_done += 1
        st.epoch_loss[0] += loss_value
        st.epoch_loss[1] += 1
        seen += global_batch
        smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
        lr = optimizer.param_groups[0]["lr"]
        if d.is_main:
            logger.step(st.global_step, loss_value, lr)
            bar.update(1)
            if st.batches_done % 5 == 0 or st.batches_done == steps_per_epoch:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"loss {smooth:.4f} lr {lr:.2e} {rate:.0f} img/s mem {memory_text(d.device)}",
                                    refresh=False)
        if cfg.ckpt_every_steps and st.global_step % cfg.ckpt_every_steps == 0:
            on_step()
        if st.batches_done >= steps_per_epoch:
            break  # before the loader reads (and augments) a batch this epoch will not use
    bar.close()


def fit(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` into `out_dir`; returns the summary (also written as summary.json)."""
    from ..data import build_datasets

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    d = init_distributed(cfg.device)
    say = (lambda msg: tqdm.write(msg)) if d.is_main else (lambda msg: None)
    saved_threads, saved_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.batch_size % d.world_size:
            raise TrainError(f"batch_size {cfg.batch_size} (global) is not divisible by {d.world_size} processes")
        per_rank = cfg.batch_size // d.world_size
        if (cfg.mixup > 0 or cfg.cutmix > 0) and per_rank % 2:
            raise TrainError(f"mixup/cutmix need an even batch per process, got {per_rank}")
        if not resume and ckpt.list_checkpoints(out_dir):  # every rank checks, so all stop together
            raise TrainError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another --output")
        if d.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)

        # -- data and model
        seed_everything(cfg.seed)
        bundle = build_datasets(data_spec(cfg))
        if bundle.skipped:
            say(f"skipped {len(bundle.skipped)} unreadable file(s): {', '.join(bundle.skipped[:5])}"
                + (" ..." if len(bundle.skipped) > 5 else ""))
        if bundle.unchecked and cfg.verify_data is None:
            from ..data.common import VERIFY_MAX_FILES

            splits = " and ".join(f"{n:,} {split}" for split, n in bundle.unchecked.items())
            say(f"not opening the {splits} files up front (more than {VERIFY_MAX_FILES:,} in a split; "
                "verify_data=true forces it): an unreadable file is skipped, with a warning, when it is loaded")
        model, model_kwargs = build_model(cfg, bundle.num_classes, bundle.img_size, bundle.in_chans,
                                          bundle.num_frames if bundle.kind == "video" else None)
        model.to(d.device)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"model {cfg.model} ({n_params / 1e6:.2f}M params, backprop {cfg.backprop}) on {bundle.kind} data "
            f"{cfg.data}: {len(bundle.train)} train / {len(bundle.val)} val, {bundle.num_classes} classes; "
            f"device {d.device} x {d.world_size}; global batch {cfg.batch_size}, lr {cfg.effective_lr:.3g} "
            f"(= {cfg.lr:g} x {cfg.batch_size}/512)")

        sampler = train_sampler(cfg, bundle.train, d)
        steps_per_epoch = len(sampler) // per_rank
        if cfg.steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
        if steps_per_epoch < 1:
            raise TrainError(f"{len(bundle.train)} training samples give no full batch of {per_rank} per process: "
                             "lower --batch-size")
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
        scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.amp == "fp16")
        ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema_decay)
        mix = mixup_fn(cfg, bundle.num_classes)
        if mix is not None:
            from timm.loss import SoftTargetCrossEntropy

            criterion = SoftTargetCrossEntropy()
        else:
            criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        # -- resume
        st = RunState()
        if resume:
            found = ckpt.load_latest(out_dir, log=say)
            if found is None:
                say(f"no checkpoint in {out_dir}: starting from scratch")
            else:
                path, state = found
                changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items() if getattr(cfg, k, v) != v}
                if changed:
                    say(f"warning: config differs from the checkpoint's: {changed}")
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                if ema is not None and state.get("ema") is not None:
                    ema.load_state_dict(state["ema"])
                st = RunState(state["epoch"], state["batches_done"], state["global_step"], state["best_top1"],
                              list(state["history"]), list(state["epoch_loss"]))
                rngs = state["rng"]
                ckpt.set_rng_state(rngs[d.rank] if len(rngs) == d.world_size else rngs[0])
                say(f"resumed from {path} (epoch {st.epoch + 1}, batch {st.batches_done}, step {st.global_step})")
        else:
            seed_everything(cfg.seed + d.rank)  # per-rank augmentation and drop-path draws

        net = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) \
            if d.enabled else model
        logger = RunLogger(out_dir, enabled=d.is_main, purge_step=st.global_step if resume else None)
        val_loader = eval_loader(bundle.val, per_rank, cfg.num_workers, d)

        def save(is_best: bool = False) -> None:
            rngs = [ckpt.rng_state()]
            if d.enabled:
                rngs = [None] * d.world_size
                torch.distributed.all_gather_object(rngs, ckpt.rng_state())
            if not d.is_main:
                return
            state = dict(model=model.state_dict(), model_name=cfg.model, model_kwargs=model_kwargs,
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), ema=ema.state_dict() if ema is not None else None,
                         epoch=st.epoch, batches_done=st.batches_done, global_step=st.global_step,
                         best_top1=st.best_top1, history=st.history, epoch_loss=st.epoch_loss,
                         config=cfg.to_dict(), rng=rngs, world_size=d.world_size)
            ckpt.save_checkpoint(state, out_dir, st.global_step, cfg.keep_last, is_best)

        # -- epochs
        loader_gen = torch.Generator()
        while st.epoch < cfg.epochs:
            sampler.set_epoch(st.epoch if cfg.repeated_aug == 1 else st.epoch + 100_000 * cfg.seed)
            loader_gen.manual_seed(cfg.seed * 1_000_003 + st.epoch)  # worker seeds: a function of the epoch
            loader = DataLoader(bundle.train, batch_size=per_rank, sampler=SkipSampler(sampler, st.batches_done * per_rank),
                                num_workers=cfg.num_workers, pin_memory=d.device.type == "cuda", drop_last=True,
                                generator=loader_gen, persistent_workers=False)
            train_one_epoch(net, ema, loader, optimizer, scheduler, scaler, criterion, mix, cfg, st,
                            steps_per_epoch, d, save, logger)

            row = {"epoch": st.epoch + 1, "step": st.global_step,
                   "train_loss": st.epoch_loss[0] / max(st.epoch_loss[1], 1),
                   "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - t_start, 2)}
            last = st.epoch + 1 == cfg.epochs
            is_best = False
            if (st.epoch + 1) % cfg.eval_every == 0 or last:
                metrics = evaluate(model, val_loader, d.device, cfg.amp)
                row.update({f"val_{k}": v for k, v in metrics.items() if k != "count"})
                if ema is not None:
                    row["val_top1_ema"] = evaluate(ema.module, val_loader, d.device, cfg.amp)["top1"]
                is_best = metrics["top1"] > st.best_top1
                st.best_top1 = max(st.best_top1, metrics["top1"])
                say(f"epoch {st.epoch + 1}: train loss {row['train_loss']:.4f}, val top-1 {metrics['top1']:.2f}%"
                    + (f", top-5 {metrics['top5']:.2f}%" if "top5" in metrics else "")
                    + f", val loss {metrics['loss']:.4f}")
            st.history.append(row)
            st.epoch, st.batches_done, st.epoch_loss = st.epoch + 1, 0, [0.0, 0]
            logger.epoch(st.history) if d.is_main else None
            save(is_best)
        logger.close()

        # -- final weights and summary
        summary: dict = {}
        if d.is_main:
            extra = {"config": cfg.to_dict(), "class_names": list(bundle.class_names)}
            ckpt.save_weights(model, out_dir / ckpt.WEIGHTS, cfg.model, model_kwargs, extra)
            if ema is not None:
                ckpt.save_weights(ema.module, out_dir / "model_ema.safetensors", cfg.model, model_kwargs, extra)
            final = st.history[-1]
            summary = {"model": cfg.model, "params": n_params, "backprop": cfg.backprop, "epochs": cfg.epochs,
                       "steps": st.global_step, "val_top1": final.get("val_top1"), "val_top5": final.get("val_top5"),
                       "best_top1": st.best_top1, "wall_time_s": round(time.perf_counter() - t_start, 1),
                       "skipped_files": list(bundle.skipped), "output": str(out_dir)}
            if cfg.memory_table:
                summary["memory"] = memory_table(model, bundle.train, d.device, say)
            summary["wall_time_s"] = round(time.perf_counter() - t_start, 1)
            ckpt.atomic_write(out_dir / "summary.json", lambda f: f.write(_json(summary)))
            say(format_summary(summary))
        return summary
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det)
        shutdown()


def _json(obj) -> bytes:
    import json

    return json.dumps(obj, indent=1).encode()


def memory_table(model: nn.Module, dataset, device: torch.device, say: Callable[[str], None], batch: int = 8) -> dict:
    """Peak activation bytes per image of one training step, reversible vs autograd backprop (the lead's
    exact meter, revvit.bench.memory). Measured on a copy of the trained model."""
    from ..bench.memory import measure_training_memory

    if not hasattr(model, "set_backprop"):
        return {}
    x = torch.stack([dataset[i][0] for i in range(batch)]).to(device)
    y = torch.tensor([dataset[i][1] for i in range(batch)], device=device)
    probe = copy.deepcopy(model)
    result = {}
    for mode in ("reversible", "autograd"):
        probe.set_backprop(mode)
        result[mode] = measure_training_memory(probe, x, y).bytes_per_sample
    probe.set_backprop(model.backprop)
    ratio = result["autograd"] / max(result["reversible"], 1)
    shape = "x".join(str(s) for s in x.shape[1:])
    say(f"\npeak activation memory per image (one training step, batch {batch}, input {shape}, {device.type}):\n"
        f"  {'backprop':<12}{'KB/image':>12}\n"
        f"  {'reversible':<12}{result['reversible'] / 1024:>12.1f}\n"
        f"  {'autograd':<12}{result['autograd'] / 1024:>12.1f}\n"
        f"  reversible needs {ratio:.1f}x less activation memory")
    return {"batch": batch, "bytes_per_image": result, "ratio": ratio}


def format_summary(s: dict) -> str:
    top5 = f", top-5 {s['val_top5']:.2f}%" if s.get("val_top5") is not None else ""
    return (f"\ndone: {s['model']} ({s['params'] / 1e6:.2f}M params, {s['backprop']} backprop), {s['epochs']} epochs / "
            f"{s['steps']} steps in {s['wall_time_s']:.1f}s\n"
            f"  test top-1 {s['val_top1']:.2f}%{top5} (best {s['best_top1']:.2f}%)\n"
            f"  outputs in {s['output']}: model.safetensors, checkpoints, metrics.json/.csv, curves.png, tensorboard/")


# -- evaluating a saved model -----------------------------------------------------------------------
def evaluate_checkpoint(path: str | Path, data: str, batch_size: int = 64, num_workers: int = 2,
                        device: str = "auto", amp: Optional[str] = None) -> dict:
    """Load a revvit checkpoint/.safetensors and evaluate it on the val split of `data`."""
    from ..data import build_datasets
    from .config import from_dict

    model, info = ckpt.load_model(path)
    saved = dict(info.get("config") or {})
    kw = info.get("model_kwargs", {})
    cfg = from_dict({k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    cfg.img_size = kw.get("img_size", cfg.img_size)
    cfg.in_chans = kw.get("in_chans", cfg.in_chans)
    if "num_frames" in kw:
        cfg.num_frames = kw["num_frames"]
    d = init_distributed(device)
    try:
        bundle = build_datasets(data_spec(cfg, data, info.get("model")), splits=("val",))  # train is not scanned
        classes = kw.get("num_classes")
        if classes is not None and classes != bundle.num_classes:
            raise TrainError(f"{path} predicts {classes} classes but {data} has {bundle.num_classes}")
        model.to(d.device)
        metrics = evaluate(model, eval_loader(bundle.val, batch_size, num_workers, d), d.device, amp)
        metrics["model"] = info.get("model")
        return metrics
    finally:
        shutdown()
