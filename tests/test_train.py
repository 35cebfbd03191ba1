"""revvit.train: config, optimiser groups and schedule, checkpoints, the loop end to end (digits, image
folders, video), distributed equivalence, AMP, divergence handling."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import revvit  # noqa: F401
from fixtures import write_corrupt, write_image_folder, write_video_list
from revvit.data import build_datasets
from revvit.data import common as data_common
from revvit.train import (
    ConfigError,
    TrainError,
    TrainingDiverged,
    apply_overrides,
    evaluate_checkpoint,
    fit,
    load_config,
)
from revvit.train import checkpoint as ckpt
from revvit.train.config import DEFAULT_CONFIG, DIGITS_VIDEO_CONFIG, TrainConfig, from_dict
from revvit.train.optim import build_optimizer, build_scheduler
from revvit.train.parts import data_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# A CPU-second model and run: digits at 16x16, 2 blocks of width 32, no augmentation, no logging bar.
TINY = ["model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "img_size=16", "in_chans=1",
        "train_aug=false", "mixup=0", "cutmix=0", "label_smoothing=0", "memory_table=false", "progress=false",
        "num_workers=0", "threads=1", "warmup_epochs=0", "drop_path=0"]


def tiny(*overrides: str) -> TrainConfig:
    return apply_overrides(load_config(), TINY + list(overrides))


# -- config -------------------------------------------------------------------------------------------
def test_overrides_are_typed_by_field():
    cfg = apply_overrides(TrainConfig(), ["epochs=3", "amp=none", "clip_grad=0.5", "train_aug=false",
                                          "betas=[0.8, 0.9]", "model_kwargs.depth=2", "auto_augment=null"])
    assert (cfg.epochs, cfg.amp, cfg.clip_grad, cfg.train_aug, cfg.betas) == (3, None, 0.5, False, [0.8, 0.9])
    assert cfg.model_kwargs == {"depth": 2} and cfg.auto_augment is None


def test_choosing_another_model_drops_the_previous_models_kwargs():
    assert apply_overrides(load_config(), ["model=rev_mvit_tiny"]).model_kwargs == {}
    cfg = apply_overrides(load_config(), ["model_kwargs.depth=2", "model=rev_vit_small_patch16_224"])
    assert cfg.model_kwargs == {"depth": 2}


def test_unknown_key_is_refused_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*valid keys:.*epochs.*batch_size"):
        apply_overrides(TrainConfig(), ["epoch=3"])


@pytest.mark.parametrize("item, message", [("epochs=three", "epochs"), ("amp=fp8", "amp must be"),
                                           ("batch_size=0", "batch_size must be >= 1"), ("lr", "key=value"),
                                           ("train_aug=maybe", "train_aug")])
def test_bad_values_are_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [item])


def test_verify_data_defaults_to_auto_and_reaches_the_data_spec():
    assert TrainConfig().verify_data is None and data_spec(TrainConfig()).verify is None
    cfg = apply_overrides(TrainConfig(), ["verify_data=true"])
    assert cfg.verify_data is True and data_spec(cfg).verify is True
    assert apply_overrides(cfg, ["verify_data=none"]).verify_data is None


def test_bad_yaml_key_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: rev_vit_tiny_patch16_224\nwarmup: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'warmup'"):
        load_config(tmp_path / "bad.yaml")


def test_recipes_reproduce_the_official_absolute_learning_rates():
    official = {"rev_vit_small": (5e-4, 512, 0.05, 1.0, 0.1), "rev_vit_base": (5e-4, 512, 0.1, 2.0, 0.2),
                "rev_mvit_base": (2.5e-4, 256, 0.05, 1.0, 0.1), "rev_mvit_base_16x4": (1.6e-3, 256, 0.07, None, 0.05)}
    for name, (lr, batch, wd, clip, dp) in official.items():
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.batch_size == batch and cfg.effective_lr == pytest.approx(lr), name
        assert (cfg.weight_decay, cfg.clip_grad, cfg.drop_path) == (wd, clip, dp), name
        assert (cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.reprob, cfg.betas) == \
            (0.8, 1.0, 0.1, 0.25, [0.9, 0.999])
    assert load_config(CONFIGS / "rev_mvit_base_16x4.yaml").repeated_aug == 2


def test_digits_yaml_is_the_embedded_default():
    assert load_config(CONFIGS / "digits.yaml") == load_config() == from_dict(DEFAULT_CONFIG)


def test_digits_video_yaml_is_the_embedded_video_default():
    video = load_config(data="digits-video")
    assert load_config(CONFIGS / "digits_video.yaml") == video == from_dict(DIGITS_VIDEO_CONFIG)
    assert (video.model, video.data, video.num_frames) == ("rev_mvit_tiny_video", "digits-video", 4)


# -- optimiser and schedule ---------------------------------------------------------------------------
def test_no_weight_decay_on_biases_norms_and_pos_embed():
    import timm

    model = timm.create_model("rev_vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    opt = build_optimizer(model, tiny("lr=1e-3", "batch_size=256", "weight_decay=0.05"))
    decay, no_decay = sorted(opt.param_groups, key=lambda g: -g["weight_decay"])
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "pos_embed" in exempt and "norm.weight" in exempt and "head.bias" in exempt
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)  # linear scaling: 1e-3 x 256/512


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    # The Rev-ViT-S recipe at 10 optimiser steps per epoch: 300 epochs, 70 of warmup, 5e-4 at 512 images.
    cfg = load_config(CONFIGS / "rev_vit_small.yaml")
    warmup, total = 700, 3000
    scheduler = build_scheduler(build_optimizer(nn.Linear(4, 4), cfg), cfg, steps_per_epoch=10)

    def lr_before(step: int) -> float:  # the lr the optimiser uses for step `step` (0-based)
        if step:
            scheduler.step_update(step)
        return {g["lr"] for g in scheduler.optimizer.param_groups}.pop()  # one lr for every group

    assert lr_before(0) == pytest.approx(cfg.warmup_lr)
    assert lr_before(warmup // 2) == pytest.approx((cfg.warmup_lr + 5e-4) / 2)
    assert lr_before(warmup) == pytest.approx(5e-4)  # the official absolute rate at the end of warmup
    assert lr_before((warmup + total) // 2) == pytest.approx(cfg.min_lr + (5e-4 - cfg.min_lr) / 2)
    assert lr_before(total) == pytest.approx(cfg.min_lr)
    # the state in the checkpoint restores the position exactly
    again = build_scheduler(build_optimizer(nn.Linear(4, 4), cfg), cfg, steps_per_epoch=10)
    again.load_state_dict(scheduler.state_dict())
    again.step_update(1234)
    scheduler.step_update(1234)
    assert again.optimizer.param_groups[0]["lr"] == scheduler.optimizer.param_groups[0]["lr"]


# -- checkpoints --------------------------------------------------------------------------------------
def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()

    def crash(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.atomic_write(path, crash)
    assert path.read_bytes() == before


def test_corrupt_newest_checkpoint_is_named_and_the_previous_used(tmp_path):
    for step in (1, 2):
        ckpt.atomic_save({"model": {"w": torch.full((3,), float(step))}, "global_step": step},
                         tmp_path / f"ckpt_{step:08d}.pt")
    newest = tmp_path / "ckpt_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    messages = []
    path, state = ckpt.load_latest(tmp_path, log=messages.append)
    assert path.name == "ckpt_00000001.pt" and state["global_step"] == 1
    assert len(messages) == 1 and "ckpt_00000002.pt" in messages[0] and "corrupt or truncated" in messages[0]
    (tmp_path / "ckpt_00000001.pt").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_latest(tmp_path, log=messages.append)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    ckpt.atomic_save(state, tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


# -- the loop end to end ------------------------------------------------------------------------------
def test_digits_run_learns_and_writes_its_records(tmp_path):
    cfg = tiny("epochs=2", "batch_size=32", "lr=0.03", "eval_every=1", "ckpt_every_steps=10", "keep_last=2")
    summary = fit(cfg, tmp_path)
    assert summary["val_top1"] > 40  # chance is 10%
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["train_loss"] < history[0]["train_loss"]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(ckpt.list_checkpoints(tmp_path)) == 2 and (tmp_path / "best.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "rev_vit_tiny_patch16_224"
    assert json.loads(meta["model_kwargs"])["embed_dim"] == 32
    # The safetensors alone rebuild the model: same weights, same accuracy.
    model, _ = ckpt.load_model(tmp_path / "model.safetensors")
    saved = torch.load(ckpt.list_checkpoints(tmp_path)[0], weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    top1 = evaluate_checkpoint(tmp_path / "model.safetensors", "digits", device="cpu")["top1"]
    assert top1 == pytest.approx(summary["val_top1"])


def test_image_folder_train_then_eval_with_a_corrupt_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["red", "green", "blue"], per_class=6, size=20)
    write_corrupt(root / "train" / "red" / "broken.png")
    cfg = tiny("data=" + str(root), "in_chans=3", "epochs=4", "batch_size=6", "lr=0.05")
    summary = fit(cfg, tmp_path / "run")
    assert summary["skipped_files"] == [str(root / "train" / "red" / "broken.png")]
    m = evaluate_checkpoint(tmp_path / "run" / "best.pt", str(root), device="cpu")
    assert m["count"] == 18 and m["top1"] >= 60  # colour classes; chance 33%
    assert "top5" not in m  # 3 classes


def test_eval_builds_only_the_val_split(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["red", "green"], per_class=2, size=16)
    fit(tiny("data=" + str(root), "in_chans=3", "epochs=1", "batch_size=2", "verify_data=true"), tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    expected = evaluate_checkpoint(weights, str(root), device="cpu")
    write_corrupt(root / "train" / "red" / "broken.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verifying train/ (verify_data=true in the run's config) would warn
        assert evaluate_checkpoint(weights, str(root), device="cpu") == expected
    shutil.rmtree(root / "train")
    assert evaluate_checkpoint(weights, str(root), device="cpu") == expected


def test_large_unverified_split_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_common, "VERIFY_MAX_FILES", 3)  # train holds 4 images, val 2
    root = write_image_folder(tmp_path / "imgs", ["red", "green"], per_class=2, size=16, splits=("train",))
    write_image_folder(root, ["red", "green"], per_class=1, size=16, splits=("val",))
    fit(tiny("data=" + str(root), "in_chans=3", "epochs=1", "batch_size=2"), tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if "up front" in line]
    assert len(lines) == 1 and "4 train files" in lines[0] and "verify_data=true" in lines[0]


def test_video_train_then_eval_averages_views(tmp_path):
    lists = write_video_list(tmp_path / "vids", num_classes=2, per_class=3, frames=16, size=32)
    cfg = tiny("data=" + str(lists), "model=rev_mvit_tiny_video", "model_kwargs={}", "img_size=32", "in_chans=3",
               "num_frames=4", "sampling_rate=2", "test_clips=2", "epochs=1", "batch_size=2", "lr=0.01")
    summary = fit(cfg, tmp_path / "run")
    assert summary["steps"] == 3
    weights = tmp_path / "run" / "model.safetensors"
    m = evaluate_checkpoint(weights, str(lists), batch_size=4, device="cpu")
    assert m["count"] == 6 and 0 <= m["top1"] <= 100
    # by hand: each video's score is the mean of its views' softmax
    model, _ = ckpt.load_model(weights)
    val = build_datasets(data_spec(cfg), splits=("val",)).val
    with torch.no_grad():
        views = [model(val[i][0]).softmax(-1) for i in range(len(val))]  # (V, classes), V = 2 clips
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    assert all(v.shape[0] == 2 for v in views)
    mean = torch.stack([v.mean(0) for v in views])
    assert m["loss"] == pytest.approx(F.nll_loss(mean.log(), labels).item(), rel=1e-5)
    assert m["top1"] == pytest.approx(100 * (mean.argmax(-1) == labels).float().mean().item())
    first_view_only = torch.stack([v[0] for v in views])
    assert m["loss"] != pytest.approx(F.nll_loss(first_view_only.log(), labels).item(), rel=1e-5)


def test_bf16_autocast_trains(tmp_path):
    summary = fit(tiny("amp=bf16", "epochs=2", "batch_size=32", "lr=0.03", "steps_per_epoch=15"), tmp_path)
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert history[1]["train_loss"] < history[0]["train_loss"] and summary["val_top1"] > 20


def test_nan_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny("lr=1e30", "epochs=1", "batch_size=32", "ckpt_every_steps=1", "weight_decay=0")
    with pytest.raises(TrainingDiverged, match=r"at step \d+.*lower lr.*--amp bf16.*clip_grad") as err:
        fit(cfg, tmp_path)
    step = int(str(err.value).split("at step ")[1].split()[0])
    good = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in good] == [f"ckpt_{step - 1:08d}.pt"] or (step == 1 and not good)
    if good:
        state = torch.load(good[0], weights_only=True)
        assert state["global_step"] == step - 1
    assert not (tmp_path / "model.safetensors").exists()


def test_unknown_model_lists_the_revvit_models(tmp_path):
    with pytest.raises(TrainError, match=r"unknown model 'rev_vit_tinny'. revvit models: .*timm has \d+ others") as e:
        fit(tiny("model=rev_vit_tinny"), tmp_path)
    assert "rev_vit_tiny_patch16_224" in str(e.value) and "rev_mvit_base" in str(e.value)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    ckpt.atomic_save({"model": {}, "global_step": 1}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(TrainError, match="--resume"):
        fit(tiny("epochs=1"), tmp_path)


# -- distributed --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(fn, *args, tries: int = 3) -> None:
    """`fn(rank, port, *args)` in two spawned processes that rendezvous on a free port. The port is free when
    chosen but not held until rank 0 binds it, seconds later; if another process took it in between, the
    processes fail with "address already in use" and the pair is started again on another port. A process
    whose `fn` returned exits at once (`_then_exit`)."""
    for attempt in range(tries):
        try:
            mp.start_processes(_then_exit, args=(fn, _free_port(), *args), nprocs=2, start_method="spawn",
                               join=True)
            return
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            if attempt + 1 == tries or not any(s in str(e) for s in ("EADDRINUSE", "ddress already in use")):
                raise


def _then_exit(rank: int, fn, *args) -> None:
    """`fn(rank, *args)`, then leave without the interpreter's teardown: gloo's threads, still running after
    `destroy_process_group`, occasionally abort a finished process there ("terminate called without an
    active exception", SIGABRT; seen once in CI after both ranks had written their results). An exception
    from `fn` propagates as usual."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_env(rank: int, port: int, world: int = 2) -> None:
    """What torchrun sets for rank `rank` of `world`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _worker(rank: int, port: int, world: int, overrides: list, out: str) -> None:
    torchrun_env(rank, port, world)
    fit(tiny(*overrides), out)


def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path):
    # Deterministic training (no augmentation, dropout or mixup); the per-epoch order is the same
    # permutation, so the two ranks' interleaved halves of each global batch make up the 1-process batch,
    # and DDP's gradient average over ranks equals the loss mean over the global batch.
    overrides = ["epochs=2", "batch_size=16", "steps_per_epoch=4", "lr=0.01", "clip_grad=1.0", "device=cpu"]
    fit(tiny(*overrides), tmp_path / "one")
    spawn_two(_worker, 2, overrides, str(tmp_path / "two"))
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = torch.load(tmp_path / "one" / "ckpt_00000004.pt", weights_only=True)["model"]
    assert any(not torch.equal(start[k], one[k]) for k in one)  # training moved the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_batch_larger_than_the_data_is_refused_before_the_output_folder_exists(tmp_path):
    with pytest.raises(TrainError, match="no full batch"):
        fit(tiny("batch_size=5000", "epochs=1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_files_written_atomically_are_ordinary_files_readable_by_others(tmp_path):
    from revvit.io import atomic_write

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(umask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
