"""A run folder's files are never lost: a run's weights are never trained over afresh, resuming falls back to
best.pt, a failed resume leaves the run's config as it was, a failed start removes what it created, and
settings that cannot train are refused before anything is written."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import yaml

import revvit  # noqa: F401  (registers the models)
from fixtures import write_corrupt
from revvit.cli import main
from revvit.train import checkpoint as ckpt
from revvit.train import loop

TINY = ["model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "img_size=16", "in_chans=1",
        "memory_table=false", "progress=false", "num_workers=0", "threads=1", "mixup=0", "cutmix=0",
        "steps_per_epoch=2", "--batch-size", "8"]


def _run(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch run: two step checkpoints, best.pt, model.safetensors, config.yaml."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _run(["train", "--output", str(out), *TINY, "--epochs", "2"]) == 0
    return out


def _copy(run: Path, to: Path, names=None) -> Path:
    to.mkdir()
    for p in run.iterdir():
        if p.is_file() and (names is None or p.name in names):
            (to / p.name).write_bytes(p.read_bytes())
    return to


# -- never trained over ----------------------------------------------------------------------------------
def test_a_folder_holding_only_final_weights_is_not_trained_into_afresh(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run", {ckpt.WEIGHTS})
    before = _digest(out / ckpt.WEIGHTS)
    err = _error(capsys, ["train", "--output", str(out), *TINY, "--epochs", "1"])
    assert "no checkpoint to resume from" in err and "--pretrained" in err
    assert _digest(out / ckpt.WEIGHTS) == before


def test_resume_without_any_checkpoint_but_with_a_runs_weights_is_refused(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run", {ckpt.WEIGHTS, "metrics.json"})
    before = _digest(out / ckpt.WEIGHTS)
    err = _error(capsys, ["train", "--output", str(out), "--resume", "--epochs", "3"])
    assert "no checkpoint to resume from" in err
    assert _digest(out / ckpt.WEIGHTS) == before


def test_resume_falls_back_to_best_when_every_step_checkpoint_is_unreadable(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    for p in ckpt.list_checkpoints(out):
        p.write_bytes(p.read_bytes()[:1000])  # truncated
    assert _run(["train", "--output", str(out), "--resume", "--epochs", "3"]) == 0
    said = capsys.readouterr().out
    assert "trying best.pt" in said and f"resumed from {out / ckpt.BEST}" in said
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt_00000006.pt"]  # epoch 3, after best's epoch 2
    assert len(list(out.glob("*.refused"))) == 2


def test_when_nothing_loads_every_resume_refuses_and_the_weights_stay(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    for p in [*ckpt.list_checkpoints(out), out / ckpt.BEST]:
        p.write_bytes(p.read_bytes()[:1000])
    before = {p.name: _digest(p) for p in (out / ckpt.BEST, out / ckpt.WEIGHTS)}
    for _ in range(2):  # the second try finds only *.refused and the unreadable best.pt: still no fresh start
        err = _error(capsys, ["train", "--output", str(out), "--resume", "--epochs", "3"])
        assert "no usable checkpoint" in err and "best.pt" in err and "another --output" in err
    assert {p.name: _digest(p) for p in (out / ckpt.BEST, out / ckpt.WEIGHTS)} == before  # best.pt never renamed


@pytest.mark.parametrize("content, why", [(b"", "is empty (0 bytes)"), (None, "is corrupt or truncated")])
def test_an_unreadable_checkpoint_is_named_for_what_it_is(tmp_path, content, why):
    path = tmp_path / "ckpt_00000001.pt"
    path.write_bytes(content) if content is not None else write_corrupt(path)
    messages = []
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_latest(tmp_path, log=messages.append)
    assert why in messages[0] and "pickled code" not in messages[0]


# -- config.yaml describes the run's checkpoints -----------------------------------------------------------
def test_a_failed_resume_leaves_the_runs_config_as_it_was(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    before = (out / ckpt.CONFIG).read_text()
    assert _run(["train", "--output", str(out), "--resume", "--epochs", "3", "--lr", "1e12", "clip_grad=none",
                 "train_aug=false"]) == 1
    assert (out / ckpt.CONFIG).read_text() == before


def test_a_resumed_run_records_its_new_settings_with_its_first_checkpoint(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    assert _run(["train", "--output", str(out), "--resume", "--epochs", "3"]) == 0
    assert yaml.safe_load((out / ckpt.CONFIG).read_text())["epochs"] == 3


def test_resume_of_a_run_stopped_before_its_first_checkpoint_uses_its_config(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt.CONFIG).write_text(yaml.safe_dump({"data": "digits", "img_size": 16, "in_chans": 1, "epochs": 1,
                                                   "batch_size": 8, "steps_per_epoch": 2, "memory_table": False,
                                                   "progress": False, "seed": 7,
                                                   "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2,
                                                                    "num_heads": 2}}))
    assert _run(["train", "--output", str(out), "--resume"]) == 0
    assert "starting the run again from its config.yaml" in capsys.readouterr().out
    assert yaml.safe_load((out / ckpt.CONFIG).read_text())["seed"] == 7


# -- a failed start leaves nothing ---------------------------------------------------------------------------
def _interrupt(monkeypatch):
    def stop(run, loader):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", stop)


def test_a_run_stopped_before_its_first_checkpoint_removes_the_folder_it_made(tmp_path, monkeypatch):
    _interrupt(monkeypatch)
    out = tmp_path / "run"
    assert _run(["train", "--output", str(out), *TINY, "--epochs", "1"]) == 130
    assert not out.exists()


def test_a_failed_start_in_an_existing_folder_removes_only_what_it_created(tmp_path, monkeypatch):
    _interrupt(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _run(["train", "--output", str(out), *TINY, "--epochs", "1"]) == 130
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# -- settings that cannot train, refused before anything is written ---------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ("eps=0", "eps"), ("eps=-1", "eps"), ("lr=inf", "lr must be a finite number"),
    ("min_lr=nan", "min_lr must be a finite number"), ("betas=[0.9, .nan]", "betas"), ("betas=[0.9, x]", "betas"),
    ("seed=-1", "seed must be in"), ("model_kwargs.num_classes=3", "the data has 10 classes"),
    ("data=", "data must name a data set"),
])
def test_a_setting_that_cannot_train_is_one_line_and_leaves_no_folder(setting, message, tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(capsys, ["train", "--output", str(out), *TINY, "--epochs", "1", setting])
    assert message in err
    assert not out.exists()


def test_pretrained_weights_of_another_architecture_are_refused(finished, tmp_path, capsys):
    out = tmp_path / "run"
    wide = ["model_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}"]
    err = _error(capsys, ["train", "--output", str(out), *TINY, *wide, "--epochs", "1",
                          "--pretrained", str(finished / ckpt.WEIGHTS)])
    assert "another architecture" in err and "fit the run's model" in err
    assert not out.exists()
