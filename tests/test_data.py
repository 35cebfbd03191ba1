"""Data package: what `build_datasets` returns for each source, and how it refuses bad data."""
from __future__ import annotations

import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from fixtures import write_corrupt, write_image_folder, write_video, write_video_list
from revvit.data import DataBundle, DataSpec, build_datasets, common
from revvit.data.digits import digits_split
from revvit.data.transforms import spatial_crops, video_rand_augment
from revvit.data.video import clip_indices, decode_frames

GREY = dict(mean=(0.5,), std=(0.5,))  # simple stats so channel values are easy to reason about


# ---- fixtures written once per module --------------------------------------------------------------

@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("images"), ["ant", "bee", "cat"], per_class=3, size=40)
    write_corrupt(root / "train" / "bee" / "broken.png")
    write_corrupt(root / "val" / "cat" / "broken.jpg", seed=1)
    return root


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = write_video_list(tmp_path_factory.mktemp("videos"), num_classes=3, per_class=2, frames=16, size=32,
                            class_names=["run", "jump", "swim"])
    write_corrupt(root / "videos" / "broken.mp4")
    with open(root / "train.csv", "a") as f:
        f.write("videos/broken.mp4,1\n")
    return root


@pytest.fixture(scope="module")
def same_lists_root(tmp_path_factory):
    """Clean clips; val.csv lists the same videos as train.csv, so a train item can be compared with a val view."""
    root = write_video_list(tmp_path_factory.mktemp("same"), num_classes=2, per_class=1, frames=16, size=32,
                            splits=("train",))
    shutil.copy(root / "train.csv", root / "val.csv")
    return root


def video_spec(root, **kw) -> DataSpec:
    return DataSpec(str(root), img_size=24, num_frames=4, sampling_rate=2, **kw)


# ---- digits -------------------------------------------------------------------------------------------

def test_digits_is_the_default_and_yields_normalised_images_at_img_size():
    b = build_datasets(DataSpec(img_size=32))
    x, y = b.train[0]
    assert isinstance(b, DataBundle) and b.kind == "image" and b.num_frames is None
    assert (b.num_classes, b.class_names, len(b.train), len(b.val)) == (10, [str(d) for d in range(10)], 1437, 360)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    assert b.val[0][0].shape == (3, 32, 32)
    assert x.min() < -1.5 and x.max() > 1.5  # normalised with ImageNet stats, not raw [0, 1]


def test_digits_split_is_seeded_stratified_and_held_out():
    a, b = digits_split(0), digits_split(0)
    train, val = a["train"][2], a["val"][2]
    assert np.array_equal(train, b["train"][2]) and np.array_equal(val, b["val"][2])
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1797
    assert torch.bincount(a["val"][1], minlength=10).min() >= 35  # every digit ~20% held out
    assert not np.array_equal(val, digits_split(1)["val"][2])


def test_digits_replicate_grey_to_in_chans():
    x, _ = build_datasets(DataSpec(img_size=16, in_chans=3, train_aug=False, **GREY)).train[0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert build_datasets(DataSpec(img_size=16, in_chans=1)).train[0][0].shape == (1, 16, 16)


def test_digits_train_aug_false_is_deterministic_and_true_is_not():
    plain = build_datasets(DataSpec(img_size=32, train_aug=False)).train
    assert torch.equal(plain[5][0], plain[5][0])
    aug = build_datasets(DataSpec(img_size=32, train_aug=True)).train
    torch.manual_seed(0)
    assert any(not torch.equal(aug[5][0], aug[5][0]) for _ in range(3))


def test_digits_video_shapes_labels_and_views():
    b = build_datasets(DataSpec("digits-video", img_size=32, num_frames=8, sampling_rate=2, test_clips=3, test_crops=1))
    x, y = b.train[0]
    assert b.kind == "video" and b.num_frames == 8 and b.num_classes == 10
    assert x.shape == (3, 8, 32, 32) and x.dtype == torch.float32
    views, _ = b.val[0]
    assert views.shape == (3, 3, 8, 32, 32)
    assert {b.train[i][1] for i in range(30)} <= set(range(10)) and len({b.val[i][1] for i in range(30)}) == 10


def test_digits_video_val_is_deterministic_and_the_digit_moves():
    b = build_datasets(DataSpec("digits-video", img_size=32, num_frames=8, in_chans=1, **GREY))
    v1, v2 = b.val[3][0], b.val[3][0]
    assert torch.equal(v1, v2)
    clip = v1[0, 0]  # (T, H, W)
    assert not torch.equal(clip[0], clip[-1])
    ink = (clip > 0).float().sum((1, 2))  # black background is -1 after normalisation
    assert (ink > 0).all()  # the digit is in every frame


# ---- image folders ------------------------------------------------------------------------------------

def test_image_folder_items_labels_and_class_names(image_root):
    with pytest.warns(UserWarning):
        b = build_datasets(DataSpec(str(image_root), img_size=32))
    assert (b.kind, b.num_classes, b.class_names) == ("image", 3, ["ant", "bee", "cat"])
    assert (len(b.train), len(b.val)) == (9, 9)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert b.val[8][0].shape == (3, 32, 32) and b.val[8][1] == 2
    assert sorted({y for _, y in b.train.samples}) == [0, 1, 2]


def test_image_folder_eval_transform_is_resize_then_center_crop(image_root):
    with pytest.warns(UserWarning):
        b = build_datasets(DataSpec(str(image_root), img_size=16, train_aug=False))
    tf = b.val.transform
    names = [type(t).__name__ for t in tf.transforms]
    assert names[1:3] == ["Resize", "CenterCrop"] and tf.transforms[1].size == [18]  # int(16 / 0.875)
    assert torch.equal(b.train[0][0], b.train[0][0])  # train_aug False: eval transform, deterministic


def test_corrupt_images_are_skipped_and_named(image_root):
    with pytest.warns(UserWarning, match="broken.png") as record:
        b = build_datasets(DataSpec(str(image_root), img_size=32))
    assert sorted(p.rsplit("/", 1)[-1] for p in b.skipped) == ["broken.jpg", "broken.png"]
    assert "2 unreadable" in str(record[0].message)
    assert all("broken" not in p for p, _ in b.train.samples + b.val.samples)


def test_unverified_corrupt_image_is_substituted_at_load_time(image_root):
    b = build_datasets(DataSpec(str(image_root), img_size=32, verify=False))
    i = next(k for k, (p, _) in enumerate(b.train.samples) if p.endswith("broken.png"))
    with pytest.warns(UserWarning, match="broken.png"):
        x, y = b.train[i]
    assert x.shape == (3, 32, 32) and b.train.failed == [b.train.samples[i][0]]
    assert b.skipped == []


def test_image_folder_without_class_folders_is_rejected(tmp_path):
    (tmp_path / "train").mkdir(), (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        build_datasets(DataSpec(str(tmp_path)))


def test_image_folder_with_no_images_is_rejected(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no readable images"):
        build_datasets(DataSpec(str(tmp_path)))


def test_image_folder_with_only_corrupt_images_is_rejected(tmp_path):
    write_image_folder(tmp_path, ["a"], per_class=1, splits=("val",))
    write_corrupt(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(ValueError, match="no readable images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_datasets(DataSpec(str(tmp_path)))


def test_mismatched_class_sets_are_rejected(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], per_class=1, splits=("train",))
    write_image_folder(tmp_path, ["a", "c"], per_class=1, splits=("val",))
    with pytest.raises(ValueError, match=r"only in train: \['b'\]; only in val: \['c'\]"):
        build_datasets(DataSpec(str(tmp_path)))


def test_class_without_train_images_is_rejected(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], per_class=1)
    (tmp_path / "train" / "b" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"no readable training images.*\['b'\]"):
        build_datasets(DataSpec(str(tmp_path)))


def test_image_folder_with_an_image_list_file_stays_an_image_dataset(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], per_class=1)
    (tmp_path / "train.txt").write_text("a/0.png 0\nb/0.png 1\n")
    (tmp_path / "val.txt").write_text("a/0.png 0\nb/0.png 1\n")
    assert build_datasets(DataSpec(str(tmp_path), img_size=16)).kind == "image"


def test_missing_path_and_unknown_layout_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(DataSpec(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="neither an image dataset"):
        build_datasets(DataSpec(str(tmp_path)))
    with pytest.raises(ValueError, match="is a file"):
        build_datasets(DataSpec(str(write_corrupt(tmp_path / "train.csv"))))


# ---- video lists ----------------------------------------------------------------------------------------

def test_video_train_item_is_one_clip(video_root):
    with pytest.warns(UserWarning):
        b = build_datasets(video_spec(video_root))
    assert (b.kind, b.num_classes, b.class_names, b.num_frames) == ("video", 3, ["run", "jump", "swim"], 4)
    x, y = b.train[0]
    assert x.shape == (3, 4, 24, 24) and x.dtype == torch.float32 and y == 0
    assert [label for _, label in b.train.samples] == [0, 0, 1, 1, 2, 2]


def test_video_val_item_stacks_clips_times_crops(video_root):
    with pytest.warns(UserWarning):
        b = build_datasets(video_spec(video_root, test_clips=2, test_crops=3))
    views, y = b.val[2]
    assert views.shape == (6, 3, 4, 24, 24) and y == 1
    assert not torch.equal(views[0], views[3])  # different clips differ (the square moves)


def test_corrupt_video_is_skipped_and_named(video_root):
    with pytest.warns(UserWarning, match="broken.mp4"):
        b = build_datasets(video_spec(video_root))
    assert [p.rsplit("/", 1)[-1] for p in b.skipped] == ["broken.mp4"]
    assert len(b.train) == 6


def test_unverified_corrupt_video_does_not_crash_loading(video_root):
    b = build_datasets(video_spec(video_root, verify=False))
    assert len(b.train) == 7
    with pytest.warns(UserWarning, match="broken.mp4"):
        x, y = b.train[6]  # broken: substituted by the next (wrapping) sample
    assert x.shape == (3, 4, 24, 24) and y == 0 and len(b.train.failed) == 1


def test_txt_lists_without_classes_file(tmp_path):
    root = write_video_list(tmp_path, num_classes=2, per_class=1, frames=8, fmt="txt")
    b = build_datasets(video_spec(root, test_clips=1))
    assert (b.num_classes, b.class_names, b.skipped) == (2, ["0", "1"], [])
    assert b.val[1][0].shape == (1, 3, 4, 24, 24) and b.val[1][1] == 1


def test_bad_video_lists_are_rejected(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(ValueError, match="unknown list format"):
        build_datasets(DataSpec(str(tmp_path)))
    (tmp_path / "train.json").unlink()
    (tmp_path / "train.csv").write_text("a.mp4,cat\n")
    (tmp_path / "val.csv").write_text("a.mp4,0\n")
    with pytest.raises(ValueError, match=r"train.csv:1: label 'cat' is not an integer"):
        build_datasets(DataSpec(str(tmp_path)))
    (tmp_path / "train.csv").write_text("path,label\na.mp4,2\n")
    (tmp_path / "classes.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="label 2 .* out of range for 2 classes"):
        build_datasets(DataSpec(str(tmp_path)))
    (tmp_path / "val.csv").unlink()
    with pytest.raises(ValueError, match="no val.csv"):
        build_datasets(DataSpec(str(tmp_path)))


def test_decode_returns_requested_frames_in_order(tmp_path):
    levels = np.arange(10) * 25  # frame t is uniformly grey at 25 t
    frames = np.repeat(levels[:, None, None, None], 32 * 32 * 3).reshape(10, 32, 32, 3).astype(np.uint8)
    path = str(write_video(tmp_path / "ramp.mp4", frames, size=32))
    out = decode_frames(path, lambda n: [7, 2, 2, 9])
    assert out.shape == (4, 32, 32, 3) and out.dtype == torch.uint8
    assert np.allclose(out.float().mean((1, 2, 3)).numpy(), [175, 50, 50, 225], atol=6)


def test_short_videos_repeat_their_last_frame():
    assert clip_indices(0, num_frames=4, sampling_rate=4, n=6) == [0, 4, 5, 5]


def test_three_crops_cover_left_center_right():
    x = torch.arange(12.0).expand(1, 1, 4, 12)  # (T, C, H=4, W=12), value = column
    left, center, right = spatial_crops(x, 4, 3)
    assert [c[0, 0, 0, 0].item() for c in (left, center, right)] == [0, 4, 8]


# ---- video train augmentation (the official Kinetics recipe) ---------------------------------------------

AA = "rand-m9-n4-mstd0.5-inc1"


def test_video_rand_augment_gives_every_frame_of_a_clip_the_same_ops():
    still = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    clip = torch.from_numpy(np.stack([still] * 4))  # four identical frames
    augment = video_rand_augment(AA, mean=(0.45, 0.45, 0.45), img_size=32)
    changed = 0
    for seed in range(5):
        random.seed(seed), np.random.seed(seed)
        out = augment(clip)
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[0], frame) for frame in out[1:])  # same ops and magnitudes on every frame
        changed += not torch.equal(out[0], clip[0])
    assert changed >= 4


@pytest.mark.parametrize("auto_augment, uses_randaugment", [(None, False), (AA, True)])
def test_video_train_clip_draws_randaugment_only_when_asked_for(same_lists_root, auto_augment, uses_randaugment):
    train = build_datasets(video_spec(same_lists_root, auto_augment=auto_augment, reprob=0.0), splits=("train",)).train

    def clip(seed: int) -> torch.Tensor:  # crop and flip come from torch's RNG, RandAugment from Python/numpy
        torch.manual_seed(0), random.seed(seed), np.random.seed(seed)
        return train[0][0]

    assert torch.equal(clip(1), clip(1))
    assert torch.equal(clip(1), clip(2)) is not uses_randaugment


def test_video_random_erasing_fills_one_box_through_all_frames(same_lists_root):
    def clip(reprob: float) -> torch.Tensor:
        torch.manual_seed(3)
        return build_datasets(video_spec(same_lists_root, auto_augment=None, reprob=reprob)).train[1][0]

    erased = (clip(1.0) != clip(0.0)).any(0)  # (T, H, W): where erasing changed the clip
    assert erased[0].any() and not erased[0].all()
    assert all(torch.equal(erased[0], frame) for frame in erased[1:])
    rows, cols = erased[0].any(1).nonzero(), erased[0].any(0).nonzero()
    assert erased[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a box


def test_video_train_aug_false_ignores_randaugment_and_erasing(same_lists_root):
    b = build_datasets(video_spec(same_lists_root, train_aug=False, auto_augment=AA, reprob=1.0, test_clips=1))
    assert torch.equal(b.train[1][0], b.val[1][0][0])  # the plain centred clip, as evaluated


# ---- building only the val split (evaluation) ----------------------------------------------------------

def test_val_only_image_folder_ignores_train(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], per_class=2, splits=("val",))
    write_image_folder(tmp_path, ["other"], per_class=1, splits=("train",))  # would fail the class check
    write_corrupt(tmp_path / "train" / "other" / "broken.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = build_datasets(DataSpec(str(tmp_path), img_size=16, verify=True), splits=("val",))
    assert b.train is None and (b.num_classes, b.class_names, len(b.val)) == (2, ["a", "b"], 4)
    shutil.rmtree(tmp_path / "train")
    assert build_datasets(DataSpec(str(tmp_path), img_size=16), splits=("val",)).class_names == ["a", "b"]


def test_val_only_video_lists_do_not_open_train_videos(video_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verifying train.csv would warn about broken.mp4
        b = build_datasets(video_spec(video_root, verify=True), splits=("val",))
    assert b.train is None and b.skipped == []
    assert (b.num_classes, b.class_names, len(b.val)) == (3, ["run", "jump", "swim"], 6)


def test_val_only_video_classes_come_from_the_lists_without_classes_txt(tmp_path):
    root = write_video_list(tmp_path, num_classes=2, per_class=1, frames=8, fmt="txt")
    with open(root / "train.txt", "a") as f:
        f.write("videos/never_opened.mp4 4\n")
    assert build_datasets(video_spec(root), splits=("val",)).num_classes == 5  # train list's labels, text only
    (root / "train.txt").unlink()
    b = build_datasets(video_spec(root), splits=("val",))
    assert (b.num_classes, len(b.val)) == (2, 2)


def test_unknown_split_names_are_rejected():
    with pytest.raises(ValueError, match="splits must be"):
        build_datasets(DataSpec(), splits=("test",))


# ---- up-front verification policy ------------------------------------------------------------------------

def test_auto_verify_leaves_splits_over_the_threshold_to_load_time(video_root, monkeypatch):
    monkeypatch.setattr(common, "VERIFY_MAX_FILES", 6)  # train lists 7 videos, val 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = build_datasets(video_spec(video_root))
    assert b.unchecked == {"train": 7} and b.skipped == [] and len(b.train) == 7


def test_auto_verify_checks_splits_up_to_the_threshold(image_root, monkeypatch):
    monkeypatch.setattr(common, "VERIFY_MAX_FILES", 10)  # each split holds 10 files
    with pytest.warns(UserWarning, match="2 unreadable"):
        b = build_datasets(DataSpec(str(image_root), img_size=16))
    assert b.unchecked == {} and len(b.skipped) == 2


def test_verify_true_checks_large_splits_and_false_checks_none(image_root, monkeypatch):
    monkeypatch.setattr(common, "VERIFY_MAX_FILES", 1)
    with pytest.warns(UserWarning, match="2 unreadable"):
        assert len(build_datasets(DataSpec(str(image_root), img_size=16, verify=True)).skipped) == 2
    monkeypatch.setattr(common, "VERIFY_MAX_FILES", 100)
    b = build_datasets(DataSpec(str(image_root), img_size=16, verify=False))
    assert b.skipped == [] and b.unchecked == {"train": 10, "val": 10}


# -- augmentation independent of the process that loads a sample ------------------------------------------
def test_augmentation_is_a_function_of_seed_epoch_and_position_not_of_workers(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["a", "b"], per_class=4, size=24)
    train = build_datasets(DataSpec(str(root), img_size=16, reprob=0.5)).train  # RandAugment + erasing (timm)
    data = common.EpochSeeded(train, seed=3)
    data.set_epoch(1)
    order = [5, 1, 7, 1, 0, 3]
    sampler = common.KeyedSampler(order, first=10)  # positions 10.. of the epoch; index 1 drawn twice

    def batches(workers: int) -> list:
        loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, num_workers=workers)
        return [x for x, _ in loader]

    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    data[(1, 3)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]  # the caller's
    assert (np.random.get_state()[1] == before[2]).all()  # generators are left as they were
    main = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(main, batches(2)))  # the same with 2 workers
    resumed = torch.utils.data.DataLoader(data, batch_size=2, sampler=common.KeyedSampler(order[2:], first=12))
    assert all(torch.equal(a, b) for a, b in zip(main[1:], [x for x, _ in resumed]))  # and mid-epoch
    assert not torch.equal(main[0][1], main[1][1])  # index 1 twice in an epoch: two augmentations
    data.set_epoch(2)
    assert not torch.equal(batches(0)[0], main[0])  # another epoch, another augmentation
