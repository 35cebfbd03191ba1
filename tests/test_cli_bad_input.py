"""`revvit eval` and `revvit bench` on bad input: one line naming the mistake and what to do, found before
any work (no model loaded, nothing measured), never torch's exception text or a traceback."""
import os

import pytest
import torch

from helpers import cli_refusal
from revvit import interop
from revvit.bench import run_benchmark
from revvit.models import RevViT

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
BENCH = ["bench", "--size", "tiny", "--depths", "1", "--img-size", "32", "--batch-size", "2", "--steps", "1"]


def _refused(capsys, argv: list[str]) -> str:
    """The CLI's one-line refusal of `argv`, found before anything was measured."""
    line, out = cli_refusal(capsys, argv)
    assert "measuring" not in out, out
    return line


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    interop.save(RevViT(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10),
                 folder / "model.safetensors")
    return folder / "model.safetensors"


# -- revvit eval ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "argument --batch-size: expected a whole number >= 1, got '0'"),
    ("--workers", "-1", "argument --workers: expected a whole number >= 0, got '-1'"),
    ("--workers", "two", "argument --workers: expected a whole number >= 0, got 'two'"),
])
def test_eval_sizes_are_checked_by_the_parser(weights, capsys, flag, value, message):
    assert message in _refused(capsys, ["eval", "--checkpoint", str(weights), "--data", "digits", flag, value])


def test_eval_of_a_folder_names_the_file_in_it(weights, capsys):
    err = _refused(capsys, ["eval", "--checkpoint", str(weights.parent), "--data", "digits"])
    assert err == (f"revvit eval: error: --checkpoint {weights.parent} is a folder: give a file in it, "
                   f"e.g. --checkpoint {weights}")


def test_eval_of_an_empty_folder_says_which_files_to_give(tmp_path, capsys):
    err = _refused(capsys, ["eval", "--checkpoint", str(tmp_path), "--data", "digits"])
    assert "is a folder: give a file in it, a .pt checkpoint or the model.safetensors of revvit train" in err


@NO_GPU
def test_eval_on_a_missing_gpu_is_refused_before_loading(weights, capsys):
    err = _refused(capsys, ["eval", "--checkpoint", str(weights), "--data", "digits", "--device", "cuda"])
    assert "argument --device: device 'cuda': this machine has no usable CUDA GPU" in err


# -- revvit bench -----------------------------------------------------------------------------------------
@NO_GPU
@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device", "cuda:5"],
                                   ["--family", "detection", "--device", "cuda"]])
def test_bench_on_a_missing_gpu_is_one_line(capsys, extra):
    err = _refused(capsys, ["bench", *extra])
    assert "this machine has no usable CUDA GPU (torch.cuda.is_available() is False); use cpu" in err


def test_bench_on_an_unknown_device_names_the_choices(capsys):
    err = _refused(capsys, ["bench", "--device", "tpu"])
    assert "argument --device: device must be auto, cpu, cuda or cuda:N (e.g. cuda:1), got 'tpu'" in err


def test_run_benchmark_refuses_an_unknown_device_with_its_own_message():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        run_benchmark(device="tpu", log=lambda _msg: None)


def test_bench_json_in_a_missing_folder_is_refused_before_measuring(tmp_path, capsys):
    err = _refused(capsys, [*BENCH, "--json", str(tmp_path / "missing" / "b.json")])
    assert f"no folder {tmp_path / 'missing'} (missing, or a file): create it" in err


def test_bench_json_that_is_a_folder_is_refused_before_measuring(tmp_path, capsys):
    err = _refused(capsys, [*BENCH, "--json", str(tmp_path)])
    assert f"--json {tmp_path} is a folder: give a file path" in err


def test_bench_plot_under_a_file_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _refused(capsys, ["bench", "--budget", "1GB", "--plot", str(tmp_path / "file" / "p.png")])
    assert "--plot" in err and "(missing, or a file)" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_bench_json_in_a_read_only_folder_is_refused_before_measuring(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        err = _refused(capsys, [*BENCH, "--json", str(folder / "b.json")])
    finally:
        folder.chmod(0o700)
    assert "is not writable (permission denied)" in err
