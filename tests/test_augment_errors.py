"""Augmentation errors are not data errors (issue 10, item 6): timm's posterize at 0 bits works under the
installed Pillow; a failing transform raises naming itself; an unreadable file is skipped and counted."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from fixtures import write_corrupt, write_image_folder
from revvit.data.common import TransformError
from revvit.data.folders import ImageFolderDataset
from revvit.data.transforms import image_train_transform, safe_posterize
from revvit.train import apply_overrides, fit, load_config


def test_posterize_to_zero_bits_gives_a_black_image_instead_of_raising():
    augment = rand_augment_transform("rand-m10-mstd0.5-inc1", {})
    safe_posterize(augment)
    op = next(o for o in augment.ops if o.name.startswith("Posterize"))
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # PosterizeIncreasing at 10: 0 bits kept
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(op(image)).max() == 0
    # the training transform routes it too
    train = image_train_transform(16, (0.5,) * 3, (0.5,) * 3, "rand-m10-mstd0.5-inc1", 0.0)
    ops = [o for t in train.transforms for o in getattr(t, "ops", []) if o.name.startswith("Posterize")]
    assert ops and all(o.aug_fn.__module__ == "revvit.data.transforms" for o in ops)


def test_a_failing_transform_is_named_not_taken_for_an_unreadable_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["a"], per_class=2, size=8, splits=("train",))

    def broken(image):
        raise ValueError("bits must be between 1 and 8")

    data = ImageFolderDataset([(str(p), 0) for p in sorted((root / "train" / "a").glob("*.png"))], broken)
    with pytest.raises(TransformError, match=r"transform .*broken.* failed on .*0\.png, which was read correctly"):
        data[0]
    assert data.failed == []


def test_a_file_unreadable_at_load_time_is_skipped_and_counted_from_workers(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["red", "green"], per_class=4, size=16)
    bad = write_corrupt(root / "train" / "red" / "zz_broken.png")
    cfg = apply_overrides(load_config(), [
        "data=" + str(root), "in_chans=3", "img_size=16", "model_kwargs={patch_size: 8, embed_dim: 16, depth: 1, "
        "num_heads: 1}", "verify_data=false", "num_workers=1", "epochs=1", "batch_size=9", "train_aug=false",
        "progress=false", "memory_table=false", "threads=1"])
    summary = fit(cfg, tmp_path / "run")  # the worker process warns; the record reaches the summary
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["skipped_files"] == [str(bad)] and saved["skipped_count"] == 1 == summary["skipped_count"]
