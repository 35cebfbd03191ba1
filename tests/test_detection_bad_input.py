"""`revvit detect train` / `detect eval` on bad input: every mistake is one line naming what is wrong (never a
Python exception text or a traceback), nothing good is overwritten, a failed start leaves nothing behind, and
`--resume` continues a run with its own settings."""
import json
import shutil

import pytest
import torch

from fixtures import write_corrupt
from helpers import cli_refusal
from official_format import write_pyth
from revvit.cli import main
from revvit.detection import make_digits_coco
from revvit.detection.config import DetectionConfig, apply_detection_overrides
from revvit.models import RevViT

# a detector small enough for a few seconds per run on one core
TINY = ["backbone_kwargs.embed_dim=8", "out_channels=16", "box_head_dim=16", "mask_head_dim=8", "min_size=[32]",
        "max_size=32", "anchor_sizes=[4, 8, 16, 32, 64]", "warmup_iters=2", "lr=0.002"]
DIGITS = ["digits.num_train=4", "digits.num_val=3", "digits.canvas=32", "digits.digit_size=[10, 16]"]  # embedded set
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_coco(tmp_path_factory.mktemp("coco") / "digits", num_train=4, num_val=3, canvas=32,
                            digit_size=(10, 16))


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """A finished one-epoch run trained with non-default data and batch (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["detect", "train", "--data", str(digits), "--output", str(out), "--batch-size", "2", "--epochs", "1",
                 *TINY]) == 0
    return out


def _fails(capsys, argv: list[str]) -> str:
    """The CLI's one-line refusal of `argv` (a detect command)."""
    return cli_refusal(capsys, argv)[0]


# -- resume ---------------------------------------------------------------------------------------------
def test_resume_takes_the_runs_own_data_and_batch_and_changes_only_what_is_given(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    capsys.readouterr()
    assert main(["detect", "train", "--output", str(out), "--resume", "--epochs", "2"]) == 0
    said = capsys.readouterr().out
    assert "resuming" in said and "epochs 1 -> 2" in said
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["step"] == 4  # batch 2: 2 iterations an epoch
    config = (out / "config.yaml").read_text()
    assert "batch_size: 2" in config and "epochs: 2" in config and "out_channels: 16" in config


def test_resume_still_refuses_another_batch(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    err = _fails(capsys, ["detect", "train", "--output", str(out), "--resume", "--batch-size", "4"])
    assert "batch_size: the run has 2, asked 4" in err


def test_resuming_a_finished_run_without_a_longer_schedule_rewrites_nothing(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["detect", "train", "--output", str(out), "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# -- nothing good is overwritten ------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_finished_model_without_checkpoints_is_never_overwritten(run, digits, tmp_path, capsys, resume):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run / "model.safetensors", out / "model.safetensors")
    weights = (out / "model.safetensors").read_bytes()
    err = _fails(capsys, ["detect", "train", "--data", str(digits), "--output", str(out), "--batch-size", "2",
                             *TINY, *resume])
    assert "holds the model.safetensors of a finished run" in err
    assert (out / "model.safetensors").read_bytes() == weights and sorted(p.name for p in out.iterdir()) == [
        "model.safetensors"]


# -- settings refused up front, naming the key ------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("min_size=abc", "min_size must be a whole number >= 1"),
    ("out_channels=0", "out_channels must be a whole number >= 1, got 0"),
    ("box_head_dim=0", "box_head_dim must be a whole number >= 1, got 0"),
    ("lsj_size=0", "lsj_size must be a whole number >= 1, or none"),
    ("lsj_scale=[2, 1]", "lsj_scale must be [min, max]: two numbers > 0 with min <= max, got [2, 1]"),
    ("keep_checkpoints=0", "keep_checkpoints must be a whole number >= 1, got 0"),
    ("max_iters=-1", "max_iters must be a whole number >= 1, or none (train for `epochs`), got -1"),
    ("max_iters=0", "max_iters must be a whole number >= 1, or none (train for `epochs`), got 0"),
    ("lr=-1", "lr must be a number > 0, got -1"),
    ("lr=nan", "lr must be a number > 0, got 'nan'"),
    ("lr=.inf", "lr must be a number > 0, got inf"),
    ("workers=-1", "workers must be a whole number >= 0, got -1"),
    ("hflip=2", "hflip must be a probability from 0 to 1, got 2"),
    ("epochs=abc", "epochs must be a whole number >= 1, got 'abc'"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("detector_kwargs.foo=1", "detector_kwargs: unknown option(s) ['foo']; torchvision's MaskRCNN takes: "),
    ("detector_kwargs.num_classes=3", "detector_kwargs: ['num_classes'] are set by their own settings"),
    ("digits.foo=3", "digits: unknown key(s) ['foo']; known: num_train, num_val, canvas, digit_size, seed"),
    ("digits.num_train=abc", "digits.num_train must be a whole number >= 0, got 'abc'"),
])
def test_a_bad_setting_is_one_line_naming_its_key_and_creates_nothing(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    err = _fails(capsys, ["detect", "train", "--output", str(out), *TINY, setting])
    assert message in err, err
    assert not out.exists()


def test_numbers_written_as_text_are_read_as_numbers():
    cfg = apply_detection_overrides(DetectionConfig(), ["lr=1e-3", "weight_decay=5e-2"]).check()
    assert cfg.lr == 1e-3 and cfg.weight_decay == 0.05


def test_a_zero_width_backbone_is_one_line_without_a_torch_warning(tmp_path, capsys):
    out = tmp_path / "run"
    err = _fails(capsys, ["detect", "train", "--output", str(out), *TINY, *DIGITS, "backbone_kwargs.embed_dim=0"])
    assert "embed_dim" in err and not out.exists()


@NO_GPU
@pytest.mark.parametrize("device", ["cuda", "cuda:5"])
def test_a_missing_gpu_is_one_line(tmp_path, capsys, device):
    err = _fails(capsys, ["detect", "train", "--output", str(tmp_path / "run"), *TINY, f"device={device}"])
    assert f"device={device}, but this machine has no usable CUDA GPU" in err and "use device=cpu" in err


# -- a failed start leaves nothing behind -----------------------------------------------------------------
def test_a_start_failing_at_its_first_step_removes_the_folders_it_made(digits, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    err = _fails(capsys, ["detect", "train", "--data", str(digits), "--output", str(out), "--batch-size", "2",
                             *TINY, "lr=1e30", "warmup_iters=0", "max_iters=3"])
    assert "loss is nan" in err or "loss is inf" in err
    assert not (tmp_path / "new").exists()


def test_a_failed_start_in_an_existing_folder_removes_only_what_it_added(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _fails(capsys, ["detect", "train", "--output", str(out), *TINY, *DIGITS, "lr=1e30", "warmup_iters=0",
                          "max_iters=3", "--batch-size", "2"])
    assert "loss is" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


# -- detect eval ------------------------------------------------------------------------------------------
def test_eval_of_a_folder_names_the_file_to_give(run, digits, capsys):
    err = _fails(capsys, ["detect", "eval", "--checkpoint", str(run), "--data", str(digits)])
    assert "is a folder, not a file" in err and str(run / "model.safetensors") in err


def test_eval_of_a_classifier_file_says_it_is_not_a_detector(digits, tmp_path, capsys):
    model = RevViT(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5).eval()
    pyth = write_pyth(tmp_path / "good.pyth", model)
    err = _fails(capsys, ["detect", "eval", "--checkpoint", str(pyth), "--data", str(digits)])
    assert "not a detector file" in err and "revvit eval" in err and "corrupt" not in err


def test_eval_on_a_val_set_without_annotations_says_there_is_nothing_to_evaluate(run, tmp_path, capsys):
    empty = make_digits_coco(tmp_path / "empty", num_train=4, num_val=2, canvas=32, digit_size=(10, 16))
    ann = json.loads((empty / "annotations" / "instances_val2017.json").read_text())
    assert ann["annotations"] == []  # this seed draws no digit on the two val canvases
    err = _fails(capsys, ["detect", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(empty)])
    assert "has no (non-crowd) annotations: there is nothing to evaluate" in err and "nan" not in err


def test_training_on_a_val_set_without_annotations_warns_and_prints_no_nan(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["detect", "train", "--output", str(out), *TINY, *DIGITS, "digits.num_val=2", "max_iters=1",
                 "--batch-size", "2"]) == 0  # two val canvases without a digit (seed 0)
    said = capsys.readouterr().out
    assert "there is nothing to measure AP on, so the run is not evaluated" in said
    assert "nan" not in said and "bbox_AP" not in json.loads((out / "metrics.json").read_text())[-1]


def test_unreadable_images_are_said_in_one_plain_line(run, digits, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    write_corrupt(data / "val2017" / "000001.png")
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert f"skipped 1 unreadable file(s) in {data / 'val2017'}: {data / 'val2017' / '000001.png'}" in captured.out
    assert "SkippedFiles" not in captured.err and ".py:" not in captured.err


def test_a_file_failing_at_load_time_is_one_warning_line(run, digits, tmp_path, capsys, monkeypatch):
    import revvit.detection.coco as coco

    monkeypatch.setattr(coco, "should_verify", lambda verify, n: False)  # as for sets over 20,000 images
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    write_corrupt(data / "val2017" / "000001.png")
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(data)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("revvit detect eval: warning: skipping unreadable file "), err


def test_eval_batch_size_zero_is_refused_by_the_parser(run, digits, capsys):
    err = _fails(capsys, ["detect", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(digits),
                          "--batch-size", "0"])
    assert "argument --batch-size: expected a whole number >= 1, got '0'" in err


@NO_GPU
def test_eval_on_a_missing_gpu_is_refused_before_loading(run, digits, capsys):
    err = _fails(capsys, ["detect", "eval", "--checkpoint", str(run / "model.safetensors"), "--data", str(digits),
                          "--device", "cuda"])
    assert "argument --device: device 'cuda': this machine has no usable CUDA GPU" in err
