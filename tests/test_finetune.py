"""Training on your own data (issue 10): the no-config recipe fits the data, the run writes its config,
fine-tuning from official / revvit files, resume from the run's own config, eval checks class names."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import revvit
from fixtures import write_image_folder
from official_format import write_pyth
from revvit.cli import main
from revvit.train import ConfigError, TrainError, apply_overrides, evaluate_checkpoint, fit, load_config
from revvit.train import checkpoint as ckpt
from revvit.train.config import from_dict
from revvit.train.distributed import init_distributed, shutdown
from revvit.train.finetune import adapt_state_dict, build_finetune_optimizer, layer_of, read_pretrained
from revvit.train.loop import setup
from revvit.train.recipes import FINETUNE_CONFIG, detect_in_chans, train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY_ARCH = "model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"
QUIET = ["progress=false", "memory_table=false", "num_workers=0", "threads=1"]


def tiny_vit(num_classes: int = 10, img_size: int = 16, in_chans: int = 3, **kw):
    return timm.create_model("rev_vit_tiny_patch16_224", num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                             patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw)


# three colours of the same grey value (0.299 R + 0.587 G + 0.114 B = 120): told apart by colour only
ISO_GREY = {"red": (230, 81, 30), "green": (60, 162, 60), "blue": (30, 144, 230)}


def write_colour_folder(root: Path, per_class: int = 6, size: int = 20, splits=("train", "val")) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for name, colour in ISO_GREY.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(-6, 7, size=(size, size, 1))  # the same on every channel: grey stays flat
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("data") / "colours")


# -- the no-config recipe -----------------------------------------------------------------------------------
def test_colour_only_folder_trains_in_colour_without_a_config(colours, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(colours), "--output", str(out), "--epochs", "4", "--batch-size", "6",
                 "--img-size", "16", "--lr", "1.0", TINY_ARCH, "progress=false", "drop_path=0"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["in_chans"] == 3 and cfg["model"] == "rev_vit_tiny_patch16_224"
    assert cfg["mixup"] == 0 and cfg["warmup_epochs"] == 1.0 and cfg["threads"] >= 1  # the general recipe
    header = capsys.readouterr().out
    assert "3 classes, 3 channel(s)" in header and "backprop reversible" in header and "global batch 6" in header
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] > 90  # classes differ only by colour: in grey they score chance (33%)


def test_general_recipe_uses_the_models_own_architecture_and_the_data(colours, tmp_path):
    cfg = load_config(data=str(colours), model="rev_vit_small_patch16_224")
    assert (cfg.model_kwargs, cfg.img_size, cfg.in_chans, cfg.lr, cfg.epochs) == ({}, 224, 3, 0.016, 30)
    assert cfg.threads >= 1 and cfg.num_workers >= 0
    grey = write_image_folder(tmp_path / "grey", ["a", "b"], per_class=1, size=8)
    for p in grey.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    assert detect_in_chans(str(grey)) == 1 and detect_in_chans(str(colours)) == 3
    assert load_config().in_chans == 1  # the digits demo is unchanged


def test_config_yaml_reproduces_the_run(tmp_path):
    args = ["--epochs", "1", TINY_ARCH, "img_size=16", "train_aug=false", "steps_per_epoch=4", "batch_size=16", *QUIET]
    assert main(["train", "--output", str(tmp_path / "a"), *args]) == 0
    assert main(["train", "--config", str(tmp_path / "a" / "config.yaml"), "--output", str(tmp_path / "b")]) == 0
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_config(tmp_path / "a" / "config.yaml") == load_config(tmp_path / "b" / "config.yaml")


def test_finetune_yaml_is_the_embedded_finetune_recipe():
    assert load_config(CONFIGS / "finetune.yaml") == from_dict(FINETUNE_CONFIG)


# -- fine-tuning ----------------------------------------------------------------------------------------------
def _setup(cfg, out):
    d = init_distributed("cpu")
    try:
        return setup(cfg, out, d, resume=False, t_start=time.perf_counter())
    finally:
        shutdown()


def _revvit_files(tmp_path) -> dict:
    """The same tiny 3-class RGB Rev-ViT at 16x16 as an official .pyth, a revvit .safetensors and a .pt."""
    torch.manual_seed(3)
    model = tiny_vit(num_classes=3)
    files = {"pyth": write_pyth(tmp_path / "m.pyth", model), "safetensors": tmp_path / "m.safetensors",
             "pt": tmp_path / "ckpt_00000001.pt"}
    revvit.save(model, files["safetensors"], {"class_names": ["x", "y", "z"]})
    name, kwargs = revvit.interop.model_spec(model)
    torch.save({"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs, "global_step": 1},
               files["pt"])
    return {"model": model, **files}


@pytest.mark.parametrize("kind", ["pyth", "safetensors", "pt"])
def test_finetune_keeps_the_files_weights_and_a_matching_classifier(kind, colours, tmp_path):
    files = _revvit_files(tmp_path)
    cfg = train_config(None, [f"pretrained={files[kind]}", f"data={colours}", "batch_size=6", *QUIET], log=print)
    assert cfg.model.startswith("rev_vit_")  # the .pyth names the family's base, the others the variant
    assert (cfg.model_kwargs["embed_dim"], cfg.model_kwargs["depth"], cfg.img_size, cfg.in_chans) == (32, 2, 16, 3)
    assert cfg.layer_decay == 0.75 and cfg.lr == FINETUNE_CONFIG["lr"]
    run = _setup(cfg, tmp_path / "run")
    source = files["model"].state_dict()
    assert all(torch.equal(v, source[k]) for k, v in run.model.state_dict().items())  # head kept: 3 classes
    assert revvit.load(files[kind]).state_dict().keys() == source.keys()  # revvit.load reads all three


def test_finetune_with_another_class_count_and_size_replaces_the_head_and_resamples(tmp_path, capsys):
    files = _revvit_files(tmp_path)
    cfg = train_config(None, [f"pretrained={files['pyth']}", "data=digits", "img_size=32", "batch_size=16",
                              "steps_per_epoch=2", "epochs=1", "train_aug=false", *QUIET])
    run = _setup(cfg, tmp_path / "run")
    source, own = files["model"].state_dict(), run.model.state_dict()
    assert own["head.weight"].shape == (10, 64) and own["pos_embed"].shape == (1, 16, 32)
    backbone = [k for k in source if not k.startswith(("head.", "pos_embed"))]
    assert backbone and all(torch.equal(own[k], source[k]) for k in backbone)
    said = capsys.readouterr().out
    assert "classifier replaced: the file predicts 3 classes, the run 10" in said and "pos_embed resampled" in said
    # the resampled table is the file's at the old grid points' neighbourhood: bicubic of a 2x2 grid, mean kept
    assert own["pos_embed"].mean().item() == pytest.approx(source["pos_embed"].mean().item(), abs=0.02)
    # ... and it trains, with layer-wise lr decay
    groups = build_finetune_optimizer(run.model, cfg).param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])  # stem, block 0, block 1, norm/head
    summary = fit(cfg, tmp_path / "run2")
    assert summary["steps"] == 2


def test_finetune_from_a_revvit_run_with_another_model_names_what_did_not_load(colours, tmp_path, capsys):
    files = _revvit_files(tmp_path)
    cfg = train_config(None, [f"pretrained={files['safetensors']}", f"data={colours}", "batch_size=6",
                              "model=rev_vit_tiny_patch16_224",
                              "model_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", *QUIET])
    _setup(cfg, tmp_path / "run")
    said = capsys.readouterr().out
    assert "in the file but not in the model (ignored): stack.blocks.1." in said


def test_rev_mvit_position_tables_are_resampled(tmp_path):
    for name, kw in [("rev_mvit_tiny", dict(img_size=32)), ("rev_mvit_tiny_video", dict(img_size=32, num_frames=4))]:
        small = timm.create_model(name, **kw)
        big = timm.create_model(name, **{**kw, "img_size": 64})
        state, notes = adapt_state_dict(small.state_dict(), big)
        big.load_state_dict(state)
        assert notes and all("resampled" in n for n in notes)
        x = torch.randn(1, 3, *([kw["num_frames"]] if "num_frames" in kw else []), 64, 64)
        assert big.eval()(x).isfinite().all()
    rev = timm.create_model("rev_mvit_tiny")
    groups = {layer_of(rev)(n) for n, _ in rev.named_parameters()}
    assert groups == set(range(len(rev.layer_names) + 2))


def test_read_pretrained_refuses_other_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(revvit.io.CheckpointError):
        read_pretrained(tmp_path / "x.pt")


# -- resume --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_run(colours, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(colours), "--output", str(out), "--epochs", "1", "--batch-size", "6",
                 "--img-size", "16", TINY_ARCH, *QUIET]) == 0
    return out


def test_resume_takes_the_runs_config_and_extends_it(folder_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    assert main(["train", "--output", str(run), "--resume", "--epochs", "2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 6
    cfg = load_config(run / "config.yaml")
    assert cfg.data == str(load_config(folder_run / "config.yaml").data) and cfg.img_size == 16 and cfg.epochs == 2
    assert "epochs 1 -> 2" in capsys.readouterr().out


@pytest.mark.parametrize("flag, message", [(["--model", "rev_mvit_tiny"], "another architecture"),
                                           (["--data", "digits"], "another data set"),
                                           (["--img-size", "32"], "another input size")])
def test_resume_refuses_a_change_that_cannot_apply(folder_run, flag, message, capsys):
    assert main(["train", "--output", str(folder_run), "--resume", *flag]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=message):
        train_config(None, [f"{flag[0][2:].replace('-', '_')}={flag[1]}"], folder_run, resume=True)


# -- eval ------------------------------------------------------------------------------------------------
def test_eval_refuses_other_class_names_unless_asked(folder_run, tmp_path, capsys):
    other = write_image_folder(tmp_path / "other", ["red", "green", "violet"], per_class=2, size=20, splits=("val",))
    for weights in (folder_run / "model.safetensors", ckpt.list_checkpoints(folder_run)[0]):
        with pytest.raises(TrainError, match=r"only in the weights: \['blue'\]; only in the data: \['violet'\]"):
            evaluate_checkpoint(weights, str(other), device="cpu")
        assert evaluate_checkpoint(weights, str(other), device="cpu", ignore_class_names=True)["count"] == 6
    assert main(["eval", "--checkpoint", str(folder_run / "model.safetensors"), "--data", str(other)]) == 1
    assert "--ignore-class-names" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(folder_run / "model.safetensors"), "--data", str(other),
                 "--ignore-class-names", "--workers", "0"]) == 0


# -- the accuracy comparison (python -m revvit.train.accuracy) --------------------------------------------------
def test_accuracy_candidates_have_equal_width_and_depth():
    from revvit.train.accuracy import CANDIDATES, _overrides, format_table
    from revvit.train.parts import create_run_model

    models = {}
    for name, flags in CANDIDATES.items():
        cfg = apply_overrides(load_config(), _overrides(name, flags, seed=1, epochs=1))
        assert cfg.seed == 1 and cfg.epochs == 1 and cfg.img_size == 16
        models[name] = create_run_model(cfg, 10, cfg.img_size, cfg.in_chans)[0]
    rev, autograd, vit = models.values()
    assert (rev.backprop, autograd.backprop) == ("reversible", "autograd")
    assert len(vit.blocks) == len(rev.stack) == 6 and vit.embed_dim == rev.embed_dim == 96
    table = format_table({"digits": {"a": [90.0, 92.0, 94.0]}})
    assert "| digits | a | 92.00 ± 2.00 | 90.00, 92.00, 94.00 |" in table
