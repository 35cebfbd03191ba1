"""Issue 11, "nothing lost, every mistake a clear message": bf16 exactness per family, every listed user
mistake as one line and a non-zero exit, no debris, diverging runs never checkpointed, refused checkpoints out
of the rotation, bench arguments, warnings and skipped files said once."""
from __future__ import annotations

import errno
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import revvit  # noqa: F401  (registers the models)
from fixtures import write_corrupt, write_image_folder, write_video_list
from helpers import assert_reversible_matches_autograd
from revvit import interop
from revvit.bench import run_benchmark
from revvit.cli import main
from revvit.io import CheckpointError
from revvit.train import checkpoint as ckpt

TINY = ["model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "img_size=16", "in_chans=1",
        "memory_table=false", "progress=false", "num_workers=0", "threads=1", "mixup=0", "cutmix=0",
        "--epochs", "2", "steps_per_epoch=2", "--batch-size", "8"]


# -- bf16 exactness, every family (README: "reversible gradients equal autograd's, also under bf16") ------
FAMILIES = {
    "rev_vit": ("rev_vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2),
                (2, 3, 32, 32)),
    "rev_mvit_image": ("rev_mvit_tiny", dict(img_size=32), (2, 3, 32, 32)),
    "rev_mvit_video": ("rev_mvit_tiny_video", dict(img_size=32, num_frames=4), (2, 3, 4, 32, 32)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_autocast_reversible_gradients_match_autograd_in_every_family(family, monkeypatch):
    name, kwargs, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1, **kwargs)
    x = torch.randn(shape)

    def forward(m, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(v).float()

    # the same bf16 F/G computations in both modes; only the reversible reconstruction could differ (4e-3 for
    # Rev-MViT while the stage transitions handed bf16 streams to the next stack). PyTorch's own kernels, not
    # oneDNN's: on CPUs with native bf16 (AMX), oneDNN's bf16 depthwise Conv3d weight gradient differs between
    # two calls with the same arguments (measured: equal inputs and strides, unequal results), so there autograd
    # does not even match itself (Rev-MViT's pooling weights: up to 0.46 relative between two autograd steps)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert_reversible_matches_autograd(model, x, forward=forward, rtol=1e-5)


# -- every listed mistake: one line, exit 1, no traceback, nothing left behind ----------------------------
def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"revvit {argv[0]}: error: ")
    return err


def _images(root: Path, splits=("train", "val")) -> Path:
    return write_image_folder(root, ["cat", "dog"], per_class=2, size=16, splits=splits)


def _class_sets_differ(tmp: Path) -> Path:
    root = _images(tmp / "d")
    (root / "val" / "dog").rename(root / "val" / "cow")
    return root


def _flat_images(tmp: Path) -> Path:
    root = _images(tmp / "d")
    for split in ("train", "val"):
        for f in (root / split).rglob("*.png"):
            f.rename(root / split / f"{f.parent.name}_{f.name}")
        for d in (root / split).iterdir():
            if d.is_dir():
                d.rmdir()
    return root


def _empty_val(tmp: Path) -> Path:
    root = _images(tmp / "d", splits=("train",))
    (root / "val").mkdir()
    return root


DATA_MISTAKES = {
    "class sets differ": (_class_sets_differ, [], "class folders differ"),
    "no class folders": (_flat_images, [], "no class folders"),
    "empty val": (_empty_val, [], "val is empty"),
    "train without val": (lambda tmp: _images(tmp / "d", splits=("train",)), [], "has train/ but no val/"),
    "image size not divisible by the patch": (lambda tmp: "digits", ["img_size=20"], "not divisible by patch_size"),
    "test_crops=2": (lambda tmp: "digits", ["test_crops=2"], "test_crops must be 1"),
    "unknown model": (lambda tmp: "digits", ["model=rev_vit_hugee"], "unknown model"),
}


@pytest.mark.parametrize("case", sorted(DATA_MISTAKES))
def test_a_bad_setting_or_data_set_is_one_line_and_leaves_no_folder(case, tmp_path, capsys):
    make, extra, message = DATA_MISTAKES[case]
    out = tmp_path / "run"
    err = _error(capsys, ["train", "--data", str(make(tmp_path)), "--output", str(out), *TINY, *extra])
    assert message in err
    assert not out.exists()  # validated before the folder is created


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _error(capsys, ["train", "--output", str(tmp_path / "run"), *TINY, "device=cuda"])
    assert "device=cuda" in err and "no usable CUDA GPU" in err and "device=cpu" in err


def test_output_that_is_a_file_or_under_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file, not a folder" in _error(capsys, ["train", "--output", str(f), *TINY])
    assert "is a file, so no folder can be created" in _error(capsys, ["train", "--output", str(f / "run"), *TINY])


def test_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # tests run as root, where chmod does not stop writes: the check is os.access, so that is what is faked
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    err = _error(capsys, ["train", "--output", str(ro / "run"), *TINY])
    assert "not writable" in err and str(ro) in err and not (ro / "run").exists()


def test_permission_error_during_a_run_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(ckpt, "atomic_save", denied)
    err = _error(capsys, ["train", "--output", str(tmp_path / "run"), *TINY])
    assert "permission denied" in err and "choose a location you can write" in err


def _disk_full_after(nbytes: int, monkeypatch) -> None:
    """Files opened by atomic_write fail with ENOSPC once `nbytes` are written, as on a full disk."""
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > nbytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real(fd, *a, **k)))


def test_a_full_disk_is_named_not_reported_as_a_zip_position(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_00000001.pt"
    ckpt.atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    _disk_full_after(2000, monkeypatch)
    # torch's zip writer swallows the ENOSPC and says "unexpected pos ..."; atomic_write finds the cause
    with pytest.raises(CheckpointError, match="disk full") as e:
        ckpt.atomic_save({"w": torch.zeros(100_000)}, path)
    assert "unexpected pos" not in str(e.value) and "--resume" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_disk_full_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    _disk_full_after(2000, monkeypatch)
    err = _error(capsys, ["train", "--output", str(tmp_path / "run"), *TINY])
    assert "disk full" in err and "--resume" in err
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_resume_with_another_architecture_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--output", out, *TINY]) == 0
    err = _error(capsys, ["train", "--output", out, "--resume", *TINY, "model_kwargs.embed_dim=64"])
    assert "another architecture" in err and "model_kwargs" in err and "'embed_dim': 64" in err


def test_video_model_evaluated_on_images_is_one_line(tmp_path, capsys):
    model = timm.create_model("rev_mvit_tiny_video", num_classes=10, img_size=32, in_chans=1, num_frames=4)
    path = tmp_path / "video.safetensors"
    interop.save(model, path, model_name="rev_mvit_tiny_video",
                 model_kwargs=dict(num_classes=10, img_size=32, in_chans=1, num_frames=4))
    err = _error(capsys, ["eval", "--checkpoint", str(path), "--data", "digits", "--workers", "0"])
    assert "is a video model (4-frame clips) but digits holds images" in err


def test_convert_of_a_truncated_safetensors_file_is_one_line(tmp_path, capsys):
    model = timm.create_model("rev_vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=8, depth=1)
    good = tmp_path / "m.safetensors"
    interop.save(model, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = _error(capsys, ["convert", str(cut), str(tmp_path / "o.safetensors")])
    assert "truncated or corrupt" in err and not (tmp_path / "o.safetensors").exists()
    assert "already a revvit .safetensors" in _error(capsys, ["convert", str(good), str(tmp_path / "o.safetensors")])


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="test_crops must be 1"):
        main(["train", "--debug", "--output", str(tmp_path / "run"), *TINY, "test_crops=2"])


# -- debris -----------------------------------------------------------------------------------------------
def test_stale_temporary_files_of_a_killed_write_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".ckpt_00000005.pt.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    keep = out / "notes.tmp"
    keep.write_text("the user's")
    assert main(["train", "--output", str(out), *TINY]) == 0
    assert not stale.exists() and keep.exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().out


# -- checkpoints: pickled code, rotation, non-finite tensors ----------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_named_and_a_refused_newest_checkpoint_does_not_count_toward_keep_last(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint({"model": {"w": torch.full((3,), float(step))}, "global_step": step}, tmp_path,
                             step, keep_last=2, is_best=False)
    evil = tmp_path / "ckpt_00000003.pt"
    torch.save({"model": {}, "global_step": 3, "x": Payload()}, evil)
    messages = []
    path, state = ckpt.load_latest(tmp_path, log=messages.append)
    assert state["global_step"] == 2 and len(messages) == 1
    assert "holds pickled code" in messages[0] and "refused" in messages[0] and "corrupt" not in messages[0]
    ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "global_step": 4}, tmp_path, 4, keep_last=2, is_best=False)
    # two good checkpoints kept: the refused one (kept aside as .refused) does not take a slot
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_00000004.pt", "ckpt_00000002.pt"]
    assert (tmp_path / "ckpt_00000003.pt.refused").exists()


def test_a_non_finite_tensor_is_never_written(tmp_path):
    ckpt.save_checkpoint({"model": {"w": torch.ones(3)}, "global_step": 1}, tmp_path, 1, keep_last=2, is_best=False)
    with pytest.raises(CheckpointError, match=r"refused to write: 1 tensor\(s\) hold NaN or infinity \(model.w\)"):
        ckpt.save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 2}, tmp_path, 2,
                             keep_last=1, is_best=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000001.pt"]
    model = timm.create_model("rev_vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=8, depth=1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        interop.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def _all_finite(path: Path) -> bool:
    tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    return not ckpt.non_finite(tensors)


def test_a_diverging_run_skips_non_finite_steps_stops_and_writes_only_finite_tensors(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), *TINY[:-6], "--epochs", "3", "steps_per_epoch=20", "--batch-size", "32",
            "--lr", "1000", "clip_grad=none", "ckpt_every_steps=5", "train_aug=false"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 1
    captured = capsys.readouterr()
    stop = re.search(r"gradients are not finite at 3 steps in a row \(up to step (\d+)\)", captured.err)
    assert stop, captured.err
    # isolated bad steps before it (how many depends on the CPU's arithmetic) are skipped and training goes on;
    # the two just before the stopping step were skipped, each with its own warning
    skipped = [int(n) for n in re.findall(r"non-finite gradients at step (\d+): update skipped", captured.out)]
    assert skipped[-2:] == [int(stop[1]) - 2, int(stop[1]) - 1], captured.out
    written = [p for p in out.iterdir() if p.suffix in (".pt", ".safetensors")]
    assert written and all(_all_finite(p) for p in written), [p.name for p in written if not _all_finite(p)]


# -- bench ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [(dict(batch_size=0), "batch_size"), (dict(steps=0), "steps"),
                                             (dict(img_size=0), "img_size"), (dict(depths=[0]), "depths"),
                                             (dict(depths=[]), "depths"), (dict(num_frames=-1), "num_frames")])
def test_run_benchmark_refuses_non_positive_sizes(kwargs, message):
    with pytest.raises(ValueError, match=f"{message} must be"):
        run_benchmark(**kwargs, log=lambda msg: None)


@pytest.mark.parametrize("flag", ["--batch-size", "--img-size", "--num-frames", "--steps", "--depths"])
def test_bench_cli_refuses_zero(flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", flag, "0"])
    assert e.value.code == 2 and ">= 1" in capsys.readouterr().err


# -- said once -------------------------------------------------------------------------------------------
def test_an_unreadable_video_in_both_lists_is_said_and_listed_once(tmp_path, capsys):
    root = write_video_list(tmp_path / "v", num_classes=2, per_class=2, frames=8, size=32)
    write_corrupt(root / "videos" / "bad.mp4")
    for split in ("train", "val"):
        with open(root / f"{split}.csv", "a") as f:
            f.write("videos/bad.mp4,1\n")
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--model", "rev_mvit_tiny_video", "--data", str(root), "--output", str(out),
                     "img_size=32", "num_frames=4", "sampling_rate=1", "test_clips=1", "--epochs", "1",
                     "--batch-size", "2", "steps_per_epoch=2", "memory_table=false", "progress=false",
                     "num_workers=0", "mixup=0", "cutmix=0", "auto_augment=none"]) == 0
    said = capsys.readouterr().out + "".join(str(w.message) for w in caught)
    assert said.count("unreadable file") == 1 and said.count("bad.mp4") == 1, said
    assert json.loads((out / "summary.json").read_text())["skipped_files"] == [str(root / "videos" / "bad.mp4")]




def test_a_transform_error_is_one_line_also_from_a_dataloader_worker(capsys):
    from revvit.cli import _command
    from revvit.data.common import TransformError

    def fails(args):
        raise TransformError("RandomResizedCrop failed on a.png: bad scale\nsecond line")

    def fails_in_worker(args):
        raise TransformError("Caught TransformError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1, in f\nrevvit.data.common.TransformError: "
                             "RandomResizedCrop failed on a.png: bad scale\nsecond line\n")

    class Args:
        command, debug = "train", False

    for handler in (fails, fails_in_worker):
        assert _command(handler)(Args()) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("revvit train: error: RandomResizedCrop failed on a.png: bad scale"), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err and "worker" not in err
