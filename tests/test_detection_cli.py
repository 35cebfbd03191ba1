"""`revvit detect train` and `revvit detect eval` end to end on tiny COCO sets the tests write, exact resume,
and one clear line for each bad input."""
import json
import re

import pytest

from revvit.cli import main
from revvit.detection import make_digits_coco

# a detector small enough for a few seconds per run on one core
TINY = ["backbone_kwargs.embed_dim=8", "out_channels=16", "box_head_dim=16", "mask_head_dim=8", "min_size=[32]",
        "max_size=32", "anchor_sizes=[4, 8, 16, 32, 64]", "warmup_iters=2", "lr=0.002"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_coco(tmp_path_factory.mktemp("coco") / "digits", num_train=8, num_val=3, canvas=32,
                            digit_size=(10, 16))


def test_detect_train_then_eval_through_the_cli(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["detect", "train", "--data", str(digits), "--output", str(out), "--epochs", "1", "--batch-size", "4",
                 *TINY]) == 0
    for name in ("model.safetensors", "config.yaml", "metrics.json", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    history = json.loads((out / "metrics.json").read_text())
    assert history[-1]["epoch"] == 1 and "bbox_AP" in history[-1] and "loss_mask" in history[-1]
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", str(out / "model.safetensors"), "--data", str(digits)]) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert any("Average Precision" in line for line in printed)
    assert re.fullmatch(r"bbox AP \d+\.\d\d  segm AP \d+\.\d\d", printed[-1])


def test_resume_continues_exactly(digits, tmp_path):
    """A run stopped after epoch 1 (its epoch-2 checkpoint gone) and resumed gives the uninterrupted run."""
    out = tmp_path / "run"
    args = ["detect", "train", "--data", str(digits), "--output", str(out), "--batch-size", "4", "--epochs", "2",
            *TINY, "backbone_kwargs.drop_path_rate=0.2"]
    assert main(args) == 0
    whole = json.loads((out / "metrics.json").read_text())
    newest = sorted((out / "checkpoints").glob("ckpt_*.pt"), key=lambda p: int(p.stem[5:]))[-1]
    newest.unlink()
    (out / "model.safetensors").unlink()
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert [r["loss"] for r in again] == [r["loss"] for r in whole] and len(again) == 2
    assert again[-1]["bbox_AP"] == whole[-1]["bbox_AP"]


def test_embedded_default_builds_its_digits_set(tmp_path):
    out = tmp_path / "demo"
    assert main(["detect", "train", "--output", str(out), "--epochs", "1", "digits.num_train=4", "digits.num_val=2",
                 *TINY]) == 0
    assert (out / "digits_coco" / "annotations" / "instances_train2017.json").is_file()


def _bad(root, what):
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    if what == "missing annotation file":
        ann.unlink()
        return "annotation file .*instances_val2017.json not found"
    if what == "annotation for a missing image":
        data["annotations"][0]["image_id"] = 999
        message = "image_id 999"
    elif what == "degenerate box":
        data["annotations"][0]["bbox"] = [3, 3, 0, 5]
        message = "degenerate bbox"
    elif what == "box outside the image":
        data["annotations"][0]["bbox"] = [40, 2, 5, 5]
        message = "wholly outside"
    else:  # no images
        data["images"], data["annotations"] = [], []
        message = "no images"
    ann.write_text(json.dumps(data))
    return message


@pytest.mark.parametrize("what", ["missing annotation file", "annotation for a missing image", "degenerate box",
                                  "box outside the image", "no images"])
def test_bad_input_is_one_clear_line(tmp_path, capsys, what):
    root = make_digits_coco(tmp_path / "coco", num_train=2, num_val=2, canvas=32, digit_size=(10, 16))
    message = _bad(root, what)
    assert main(["detect", "train", "--data", str(root), "--output", str(tmp_path / "o"), "--epochs", "1",
                 *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("revvit detect train: error: ")
    assert re.search(message, err), err


def test_eval_refuses_a_classifier_file_and_a_missing_file(digits, tmp_path, capsys):
    assert main(["detect", "eval", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(digits)]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["rev_mvit_b_mask_rcnn", "mvit_b_mask_rcnn", "rev_vit_b_vitdet_mask_rcnn"])
def test_recipes_are_valid_configs(name):
    from pathlib import Path

    from revvit.detection.config import load_detection_config

    cfg = load_detection_config(Path(__file__).parents[1] / "configs" / "detection" / f"{name}.yaml").check()
    assert cfg.batch_size == 64 and cfg.warmup_iters == 250 and cfg.amp == "fp16"


def test_bench_detection_memory_reversible_below_autograd(capsys):
    from revvit.bench.detection import detection_memory, format_detection_table
    from revvit.detection import create_detector

    def build(name, mode):
        return create_detector(name, 5, min_size=64, max_size=64, out_channels=16, box_head_dim=16, mask_head_dim=8,
                               backprop=mode, stage_depths=(2, 2, 3, 2), embed_dim=16)

    rows = detection_memory(build, img_size=64, batch=1, device="cpu", log=lambda _m: None,
                            candidates=(("Rev", "rev_mvit_tiny", "reversible"), ("Rev", "rev_mvit_tiny", "autograd"),
                                        ("MViT", "mvit_tiny", "autograd")))
    assert [r.backprop for r in rows] == ["reversible", "autograd", "autograd"]
    assert rows[1].mb_per_image > rows[0].mb_per_image
    assert "| Rev | autograd |" in format_detection_table(rows)


def test_bad_config_key_is_one_line(tmp_path, capsys):
    assert main(["detect", "train", "--output", str(tmp_path), "lrr=0.1"]) == 1
    err = capsys.readouterr().err
    assert "unknown key(s) ['lrr']" in err and len(err.strip().splitlines()) == 1


def _one_error(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("revvit detect train: error: "), err
    return err


def test_used_output_needs_resume_and_resume_refuses_other_batch_or_data(digits, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["detect", "train", "--data", str(digits), "--output", str(out), "--batch-size", "4", "max_iters=1", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert "already holds checkpoints: pass --resume" in _one_error(capsys, args)
    err = _one_error(capsys, [*args, "--resume", "--batch-size", "2"])
    assert "cannot resume" in err and "batch_size: the run has 4, asked 2" in err
    other = make_digits_coco(tmp_path / "other", num_train=4, num_val=2, canvas=32, digit_size=(10, 16))
    assert "data: the run has" in _one_error(capsys, [*args, "--resume", "--data", str(other)])
    assert "backbone_kwargs" in _one_error(capsys, [*args, "--resume", "backbone_kwargs.embed_dim=16"])


def test_resume_reads_checkpoints_with_weights_only(digits, tmp_path, monkeypatch):
    import torch

    out = tmp_path / "run"
    args = ["detect", "train", "--data", str(digits), "--output", str(out), "--batch-size", "4", "--epochs", "2",
            *TINY]
    assert main([*args, "max_iters=2"]) == 0
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real(*a, **kw))
    assert main([*args, "--resume", "max_iters=3"]) == 0
    assert calls and all(calls)  # the run's config, then its state: never unpickling code


@pytest.mark.parametrize("extra, message", [
    (["digits={num_train: 3, num_val: 2, canvas: 32}"], "the train set has 3 images, fewer than batch_size 4"),
    (["--backbone", "nonexistent_model"], "unknown backbone 'nonexistent_model'"),
    (["digits.num_train=0"], "digits: need num_train"),
    (["backbone_kwargs.no_such_option=1"], "no_such_option"),
])
def test_a_failed_start_is_one_line_and_leaves_no_folder(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    err = _one_error(capsys, ["detect", "train", "--output", str(out), "max_iters=1", *TINY, *extra])
    assert message in err and not out.exists()


def test_output_that_is_a_file_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file, not a folder" in _one_error(capsys, ["detect", "train", "--output", str(f)])
    with pytest.raises(ValueError, match="unknown backbone"):
        main(["detect", "train", "--debug", "--output", str(tmp_path / "r"), "--backbone", "nonexistent_model"])
