"""The `revvit` command: argument handling, error messages, eval, bench and convert output, exact resume after
SIGKILL."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from official_format import write_pyth
from revvit.bench.benchmark import vit_candidates
from revvit.cli import main
from revvit.interop import read_metadata
from revvit.models import RevViT
from revvit.train import checkpoint as ckpt

TINY = ["model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "img_size=16", "in_chans=1",
        "memory_table=false", "progress=false", "num_workers=0", "threads=1"]


def test_train_help_documents_the_lr_rule_and_overrides(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "per 512 images of GLOBAL batch" in out and "lr * batch_size / 512" in out
    assert "key=value" in out and "--resume" in out and "--backprop" in out


def test_unknown_config_key_fails_with_the_valid_keys(capsys, tmp_path):
    assert main(["train", "--output", str(tmp_path), "epoch=2"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'epoch'" in err and "valid keys:" in err and "batch_size" in err


def test_unknown_model_fails_listing_known_ones(capsys, tmp_path):
    assert main(["train", "--model", "rev_vit_hugee", "--output", str(tmp_path), *TINY]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'rev_vit_hugee'" in err and "rev_vit_small_patch16_224" in err


def test_key_value_overrides_may_stand_between_and_after_flags(capsys, tmp_path):
    assert main(["train", "epoch=2", "--output", str(tmp_path), "progress=false"]) == 1
    assert "unknown config key 'epoch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--output", str(tmp_path), "--no-such-flag"])
    # the overrides before, between and after the flags all reach the run
    out = tmp_path / "run"
    assert main(["train", "seed=7", "--epochs", "1", "steps_per_epoch=2", "--output", str(out), *TINY,
                 "eval_every=1", "mixup=0", "cutmix=0"]) == 0
    config = read_metadata(out / "model.safetensors")["config"]
    assert (config["seed"], config["steps_per_epoch"], config["epochs"], config["mixup"]) == (7, 2, 1, 0.0)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_train_takes_rev_mvit_tiny_on_the_digits_default(tmp_path):
    assert main(["train", "--model", "rev_mvit_tiny", "--img-size", "32", "--epochs", "1", "--output", str(tmp_path),
                 "steps_per_epoch=3", "memory_table=false", "progress=false", "threads=1"]) == 0
    meta = read_metadata(tmp_path / "model.safetensors")
    assert meta["model"] == "rev_mvit_tiny" and meta["model_kwargs"]["img_size"] == 32


def test_missing_config_file_is_reported(capsys):
    assert main(["train", "--config", "no/such.yaml"]) == 1
    assert "config file not found: no/such.yaml" in capsys.readouterr().err


def test_eval_prints_top1_and_top5(capsys, tmp_path):
    assert main(["train", "--output", str(tmp_path), "--epochs", "1", "--batch-size", "32", "--lr", "0.03",
                 *TINY, "steps_per_epoch=20", "train_aug=false", "mixup=0", "cutmix=0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "model.safetensors"), "--data", "digits",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    top5 = float(out.split("top-5 ")[1].split("%")[0])
    assert "(360 samples)" in out and 10 < top1 <= top5 <= 100


def test_eval_of_a_missing_checkpoint_fails_clearly(capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", "digits"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_convert_writes_safetensors_and_refuses_to_overwrite(tmp_path, capsys):
    torch.manual_seed(0)
    model = RevViT(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5).eval()
    src, dst = write_pyth(tmp_path / "m.pyth", model), tmp_path / "o.safetensors"
    assert main(["convert", str(src), str(dst)]) == 0
    assert f"wrote {dst}: RevViT" in capsys.readouterr().out and read_metadata(dst)["source"] == "m.pyth"
    assert main(["convert", str(src), str(dst)]) == 1 and "revvit convert: error:" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--force"]) == 0


def test_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--depths", "1", "--img-size", "32", "--batch-size", "2", "--steps", "1",
                 "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "measuring depth 1" in out and "| rev_vit_tiny_patch16_224 reversible | depth 1 |" in out
    labels = [r["label"] for r in json.loads((tmp_path / "b.json").read_text())]
    assert labels == [c.label for c in vit_candidates("tiny", 1, 32)]
    assert labels[0] == "rev_vit_tiny_patch16_224 reversible"
    assert labels[-1] == "timm vit_tiny_patch16_224 + checkpointing"
    with pytest.raises(SystemExit):
        main(["bench", "--depths", "12,x"])


def test_bench_compile_adds_a_compiled_twin_of_every_recomputed_row(tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--depths", "1", "--img-size", "32", "--batch-size", "2", "--steps", "1",
                 "--device", "cpu", "--compile", "aot_eager", "--json", str(tmp_path / "b.json")]) == 0
    labels = [r["label"] for r in json.loads((tmp_path / "b.json").read_text())]
    candidates = vit_candidates("tiny", 1, 32)
    assert labels == [c.label for c in candidates] + [f"{c.label}, compiled" for c in candidates if c.compiles]
    assert "rev_vit_tiny_patch16_224 reversible, recomputed in halves, compiled" in labels
    assert "rev_vit_tiny_patch16_224 reversible, compiled" not in labels  # compiled F and G are not fused


# The child process: revvit train with every fsync slowed by 50 ms, so that a checkpoint write lasts long enough
# to be killed in the middle of it.
SLOW_WRITES = ("import os, sys, time\n_fsync = os.fsync\nos.fsync = lambda fd: (time.sleep(0.05), _fsync(fd))[1]\n"
               "from revvit.cli import main\nsys.exit(main(sys.argv[1:]))")


def _revvit(out: Path, *extra: str) -> list[str]:
    # Randomness everywhere it can be: augmentation (torch, in 2 DataLoader workers), mixup/cutmix (numpy),
    # drop path (torch), sample order (sampler). Exact resume must restore all of it.
    return [sys.executable, "-c", SLOW_WRITES, "train", "--output", str(out), "--epochs", "2", "--batch-size", "16",
            "--lr", "0.02", *TINY[:-2], "num_workers=2", "threads=1", "steps_per_epoch=25", "ckpt_every_steps=5",
            "keep_last=2", "train_aug=true", "mixup=0.8", "cutmix=1.0", "drop_path=0.1", "deterministic=true", *extra]


def _kill_when(proc: subprocess.Popen, ready, what: str, seed: int) -> None:
    deadline = time.time() + 120
    while not ready():
        assert proc.poll() is None and time.time() < deadline, \
            f"seed {seed}: {what}: " + proc.communicate()[0].decode()[-2000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: {what}: finished before the kill"


def test_resume_after_sigkill_at_random_moments_with_workers_is_bit_identical(tmp_path):
    """README "exact resume": killed (SIGKILL) once mid-steps at a random moment and once in the middle of a
    checkpoint write, with 2 DataLoader workers and the newest checkpoint damaged, the resumed run ends with
    the same weights, bit for bit, and the same metrics as an uninterrupted one; no temporary file is left."""
    seed = int(os.environ.get("REVVIT_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    # 1. at a random moment during the steps after the first checkpoint (step 5 of 50)
    proc = subprocess.Popen(_revvit(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    first = time.time()
    _kill_when(proc, lambda: (killed / "ckpt_00000005.pt").exists() and time.time() > first + rng.uniform(0, 1.0),
               "kill during steps", seed)
    # 2. resumed, then killed while a file is being written (its temporary file exists), once two checkpoints exist
    proc = subprocess.Popen(_revvit(killed, "--resume"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    _kill_when(proc, lambda: len(ckpt.list_checkpoints(killed)) >= 2 and any(killed.glob(".*.tmp")),
               "kill during a write", seed)
    assert not (killed / "model.safetensors").exists()
    # Damage the newest checkpoint too: resume must name it and fall back to the one before.
    newest = ckpt.list_checkpoints(killed)[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = subprocess.run(_revvit(killed, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, f"seed {seed}: " + resumed.stderr[-2000:]
    assert f"checkpoint {newest} is corrupt or truncated" in resumed.stdout
    assert "resumed from" in resumed.stdout
    assert not list(killed.glob(".*.tmp")), f"seed {seed}: temporary files left"

    straight = subprocess.run(_revvit(tmp_path / "straight"), capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}: weights differ"
    ha = json.loads((killed / "metrics.json").read_text())
    hb = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert [(r["train_loss"], r["val_top1"]) for r in ha] == [(r["train_loss"], r["val_top1"]) for r in hb]


@pytest.mark.slow
def test_default_demo_reaches_95_percent_in_3_minutes(tmp_path):
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "revvit.cli", "train"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    wall = time.time() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["val_top1"] >= 95 and wall < 180
    assert "reversible" in run.stdout and "autograd" in run.stdout and "KB/image" in run.stdout


@pytest.mark.parametrize("argv, message", [
    (["--family", "detection", "--budget", "1GB"], "--budget do not apply"),
    (["--family", "detection", "--depths", "12"], "--depths do not apply"),
    (["--plot", "x.png"], "--plot draws the --budget depth sweep"),
    (["--family", "mvit-video", "--budget", "1GB"], "use --family vit or mvit"),
    (["--family", "mvit", "--depths", "12"], "--depths applies to --family vit"),
    (["--budget", "1GB", "--compile"], "--compile applies to the fixed-batch comparison"),
])
def test_bench_refuses_options_that_do_not_apply(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bench_budget_keeps_explicit_depths(monkeypatch, capsys):
    import revvit.bench.scaling as scaling

    seen = []
    monkeypatch.setattr(scaling, "budget_sweep", lambda family, size, depths, *a, **kw: seen.append(depths) or [])
    monkeypatch.setattr(scaling, "format_budget_table", lambda *a: "")
    assert main(["bench", "--budget", "1GB", "--depths", "12,24", "--device", "cpu"]) == 0
    assert main(["bench", "--budget", "1GB", "--device", "cpu"]) == 0
    assert seen == [[12, 24], [12, 24, 48, 96]]


def test_help_of_bench_names_detection(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "detection: Mask R-CNN" in " ".join(capsys.readouterr().out.split())
