"""Detection data and evaluation: COCO decoding, the input checks, the joint transforms, the digits default
and COCOeval, on tiny COCO sets written here."""
import ast
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from revvit.detection import (
    CategoryMap,
    CocoDetection,
    DetectionDataError,
    coco_evaluate,
    decode_segmentation,
    detection_collate,
    detection_train_transform,
    make_digits_coco,
    masks_to_boxes,
)
from revvit.detection.digits_coco import CATEGORY_IDS, MARKER

W, H = 20, 16


def _mask(xs, ys):
    m = np.zeros((H, W), np.uint8)
    m[ys, xs] = 1
    return m


# the fixture's objects: a polygon rectangle, an L in compressed RLE, a diagonal in uncompressed RLE, a crowd
RECT = _mask(slice(2, 8), slice(3, 9))
ELL = np.maximum(_mask(slice(1, 3), slice(10, 14)), _mask(slice(1, 6), slice(13, 14)))
DIAG = np.maximum.reduce([_mask(12, 2), _mask(13, 3), _mask(14, 4)])
CROWD = _mask(slice(10, 18), slice(8, 14))


def _uncompressed(m):
    flat = m.flatten(order="F")
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def _compressed(m):
    return {"size": [H, W], "counts": mask_utils.encode(np.asfortranarray(m))["counts"].decode()}


def _coco_dict():
    """Three images: a.png with three objects and a crowd, b.png with none, c.png with a box partly outside."""
    ann = [  # (image, category, bbox, segmentation, iscrowd)
        (1, 9, [2, 3, 6, 6], [[2, 3, 8, 3, 8, 9, 2, 9]], 0),
        (1, 5, [1, 10, 5, 4], _compressed(ELL), 0),
        (1, 9, [12, 2, 3, 3], _uncompressed(DIAG), 0),
        (1, 5, [10, 8, 8, 6], _uncompressed(CROWD), 1),
        (3, 5, [15, 10, 10, 10], [[15, 10, 20, 10, 20, 16, 15, 16]], 0),
    ]
    return {
        "images": [{"id": i, "file_name": n, "height": H, "width": W} for i, n in ((1, "a.png"), (2, "b.png"),
                                                                                    (3, "c.png"))],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "segmentation": s,
                         "area": float(b[2] * b[3]), "iscrowd": crowd} for k, (i, c, b, s, crowd) in enumerate(ann)],
        "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}],  # ids neither sorted nor contiguous
    }


def write_coco(root: Path, data=None, split="val") -> Path:
    """The fixture (or `data`) in the COCO layout; images white on the objects, black elsewhere."""
    data = data or _coco_dict()
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for img in data["images"]:
        pixels = (RECT | ELL | DIAG) * 255 if img["id"] == 1 else np.zeros((H, W), np.uint8)
        Image.fromarray(pixels.astype(np.uint8)).convert("RGB").save(root / f"{split}2017" / img["file_name"])
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco_root(tmp_path):
    return write_coco(tmp_path / "coco")


def test_masks_boxes_labels_and_crowd(coco_root):
    ds = CocoDetection(coco_root, "val")
    assert ds.categories == CategoryMap((5, 9), ("five", "nine")) and ds.categories.num_classes == 3
    assert [ds.categories.cat_id(lab) for lab in (1, 2)] == [5, 9] and ds.categories.label(9) == 2
    image, t = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() == 1
    assert t["image_id"] == 1
    # polygon, compressed RLE, uncompressed RLE, each decoded to its pixels; the crowd region left out
    assert np.array_equal(t["masks"].numpy(), np.stack([RECT, ELL, DIAG])) and t["masks"].dtype == torch.uint8
    assert t["boxes"].tolist() == [[2, 3, 8, 9], [1, 10, 6, 14], [12, 2, 15, 5]]
    assert t["labels"].tolist() == [2, 1, 2] and t["labels"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [0, 0, 0] and t["area"].tolist() == [36, 11, 3]


def test_image_without_annotations_and_clipping(coco_root):
    ds = CocoDetection(coco_root, "val")
    _, t = ds[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, H, W)
    _, t = ds[2]
    assert t["boxes"].tolist() == [[15, 10, 20, 16]] and ds.clipped_boxes == 1


def _edit(data, what):
    """The fixture broken one way; returns the message the check must give."""
    anns = data["annotations"]
    if what == "no images":
        data["images"], data["annotations"] = [], []
        return "no images"
    if what == "unknown image":
        anns[0]["image_id"] = 99
        return "image_id 99, which has no entry"
    if what == "degenerate":
        anns[1]["bbox"] = [1, 10, 0, 4]
        return "annotation 2 .*degenerate bbox"
    if what == "outside":
        anns[1]["bbox"] = [30, 2, 5, 5]
        return "annotation 2 .*wholly outside"
    if what == "category":
        anns[2]["category_id"] = 42
        return "unknown category id 42"
    if what == "no segmentation":
        del anns[0]["segmentation"]
        return "annotation 1 .*no segmentation"
    if what == "no id":
        del anns[3]["id"]
        return "lacks the key 'id'"
    if what == "size":
        data["images"][1]["width"] = 21
        return "b.png is 20x16 but .* says 21x16"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["no images", "unknown image", "degenerate", "outside", "category",
                                  "no segmentation", "no id", "size"])
def test_bad_annotations_refused(tmp_path, what):
    data = _coco_dict()
    message = _edit(data, what)
    root = write_coco(tmp_path / "coco", data)
    with pytest.raises(DetectionDataError, match=message):
        CocoDetection(root, "val", verify=True)


@pytest.mark.parametrize("what", ["annotation file", "image folder", "image file", "json"])
def test_bad_layout_refused(coco_root, what):
    ann = coco_root / "annotations" / "instances_val2017.json"
    if what == "annotation file":
        ann.unlink()
        message = "annotation file .*instances_val2017.json not found"
    elif what == "image folder":
        for f in (coco_root / "val2017").iterdir():
            f.unlink()
        (coco_root / "val2017").rmdir()
        message = "image folder .*val2017 not found"
    elif what == "image file":
        (coco_root / "val2017" / "c.png").unlink()
        message = "image file .*c.png listed in .* does not exist"
    else:
        ann.write_text("{not json")
        message = "not valid JSON"
    with pytest.raises(DetectionDataError, match=message):
        CocoDetection(coco_root, "val")


def test_corrupt_image_named_and_skipped(coco_root):
    (coco_root / "val2017" / "b.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable.*b.png"):
        ds = CocoDetection(coco_root, "val")
    assert len(ds) == 2 and ds.ids == [1, 3] and ds.skipped[0].endswith("b.png")
    (coco_root / "val2017" / "a.png").write_bytes(b"broken after the check")  # fails only when loaded
    with pytest.warns(UserWarning, match="skipping unreadable file .*a.png"):
        _, t = ds[0]
    assert t["image_id"] == 3 and ds.failed[0].endswith("a.png")


def test_flip_moves_boxes_and_masks_together(coco_root):
    plain, flipped = CocoDetection(coco_root, "val"), CocoDetection(coco_root, "val", detection_train_transform(1.0))
    (image, t), (image_f, t_f) = plain[0], flipped[0]
    assert torch.equal(image_f, image.flip(-1)) and torch.equal(t_f["masks"], t["masks"].flip(-1))
    x0, y0, x1, y1 = t["boxes"].unbind(1)
    assert torch.equal(t_f["boxes"], torch.stack([W - x1, y0, W - x0, y1], 1))
    assert torch.equal(t_f["boxes"], masks_to_boxes(t_f["masks"]))  # the fixture's boxes are tight
    assert torch.equal(t_f["labels"], t["labels"])
    resized = CocoDetection(coco_root, "val", detection_train_transform(0.0, short_sides=[32], max_size=64))
    image_r, t_r = resized[0]  # short side 16 -> 32: everything doubles
    assert image_r.shape == (3, 32, 40) and torch.equal(t_r["boxes"], 2 * t["boxes"])
    assert torch.equal(t_r["masks"][:, ::2, ::2], t["masks"])


@pytest.mark.parametrize("seed", range(6))
def test_large_scale_jitter_keeps_boxes_inside_and_masks_aligned(coco_root, seed):
    torch.manual_seed(seed)
    ds = CocoDetection(coco_root, "val", detection_train_transform(0.5, lsj_size=32, lsj_scale=(0.5, 2.5)))
    image, t = ds[0]
    assert image.shape == (3, 32, 32) and t["masks"].shape[1:] == (32, 32)
    n = len(t["boxes"])
    assert t["labels"].shape == (n,) and t["masks"].shape[0] == n and t["area"].shape == (n,)
    boxes = t["boxes"]
    assert (boxes >= 0).all() and (boxes <= 32).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert torch.equal(boxes, masks_to_boxes(t["masks"])) and (t["area"] > 0).all()
    # the image is white exactly on the objects: the transformed masks must still sit on the white pixels
    if n:
        on = t["masks"].any(0).bool()
        assert image[0][on].mean() > 0.5 and (image[0][~on].mean() < 0.2 if (~on).any() else True)


def test_collate_keeps_lists_and_dataset_pickles(coco_root):
    ds = CocoDetection(coco_root, "val", detection_train_transform(lsj_size=32))
    assert len(pickle.loads(pickle.dumps(ds))) == 3  # DataLoader workers under spawn get a pickled copy
    images, targets = detection_collate([ds[0], ds[1]])
    assert isinstance(images, list) and [t["image_id"] for t in targets] == [1, 2]


def _gt_predictions(ds):
    """The ground truth as MaskRCNN outputs: {image id: boxes xyxy, contiguous labels, scores, masks (N,1,H,W)}."""
    out = {}
    for image_id in ds.ids:
        anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = [torch.from_numpy(decode_segmentation(a["segmentation"], H, W)).float() for a in anns]
        out[image_id] = {"boxes": boxes, "scores": torch.ones(len(anns)),
                         "labels": torch.tensor([ds.categories.label(a["category_id"]) for a in anns]),
                         "masks": torch.stack(masks)[:, None] if masks else torch.zeros(0, 1, H, W)}
    return out


def test_evaluate_ground_truth_is_100_and_nothing_is_0(coco_root):
    ds = CocoDetection(coco_root, "val")
    preds = _gt_predictions(ds)
    res = coco_evaluate(preds, ds.coco)
    for iou_type in ("bbox", "segm"):
        m = res.metrics[iou_type]
        assert m["AP"] == m["AP50"] == m["AP75"] == 100.0, (iou_type, m)
        assert "Average Precision" in res.summaries[iou_type]
    assert res.ap_line() == "bbox AP 100.00  segm AP 100.00"
    # a detection on the crowd region is ignored, not a false positive
    crowd = {"boxes": torch.tensor([[10.0, 8, 18, 14]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5]),
             "masks": torch.from_numpy(CROWD).float()[None, None]}
    with_crowd = {k: {f: torch.cat([v[f], crowd[f]]) for f in v} if k == 1 else v for k, v in preds.items()}
    assert coco_evaluate(with_crowd, ds.coco).metrics["segm"]["AP"] == 100.0
    # labels mapped back through the categories: swapped labels score nothing
    swapped = {k: dict(v, labels=3 - v["labels"]) for k, v in preds.items()}
    assert coco_evaluate(swapped, ds.coco, iou_types=("bbox",)).metrics["bbox"]["AP"] == 0.0
    empty = {i: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "masks": torch.zeros(0, 1, H, W)} for i in ds.ids}
    res = coco_evaluate(empty, ds.coco)
    assert res.metrics["bbox"]["AP"] == res.metrics["segm"]["AP"] == 0.0 and "no bbox detections" in res.summary


def test_evaluate_refuses_wrong_sizes_and_images(coco_root):
    ds = CocoDetection(coco_root, "val")
    preds = _gt_predictions(ds)
    with pytest.raises(DetectionDataError, match="original size"):
        coco_evaluate({1: dict(preds[1], masks=preds[1]["masks"][..., :-1])}, ds.coco, iou_types=("segm",))
    with pytest.raises(DetectionDataError, match="image id 77"):
        coco_evaluate({77: preds[1]}, ds.coco)


def test_digits_coco_deterministic_tight_and_loadable(tmp_path):
    kw = dict(num_train=10, num_val=6, canvas=48, digit_size=(10, 24), seed=3)
    a, b = make_digits_coco(tmp_path / "a", **kw), make_digits_coco(tmp_path / "b", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert Path("annotations/instances_train2017.json") in files and Path("val2017/000006.png") in files
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    mtime = (a / MARKER).stat().st_mtime_ns
    assert make_digits_coco(a, **kw) == a and (a / MARKER).stat().st_mtime_ns == mtime  # reused, not rebuilt
    data = json.loads((a / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS) and CATEGORY_IDS[1] - CATEGORY_IDS[0] > 1
    styles = {"polygons" if isinstance(s, list) else type(s["counts"]).__name__
              for s in (x["segmentation"] for x in data["annotations"])}
    assert styles == {"polygons", "str", "list"}  # polygons, compressed RLE, uncompressed RLE
    for ann in data["annotations"]:  # each box is the tight box of its decoded mask
        m = decode_segmentation(ann["segmentation"], 48, 48)
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        assert [xs.min(), ys.min(), xs.max() + 1 - x, ys.max() + 1 - y] == [x, y, w, h] and m.sum() == ann["area"]
    ds = CocoDetection(a, "train")
    assert len(ds) == 10 and ds.categories.names == tuple("0123456789")
    assert any(len(ds[i][1]["boxes"]) == 0 for i in range(len(ds)))  # some canvases have no digit
    assert json.loads((make_digits_coco(tmp_path / "c", **dict(kw, seed=4)) / "annotations" /
                       "instances_train2017.json").read_text()) != data


def test_digits_coco_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import revvit.detection.digits_coco as digits_coco

    def fail(out, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        real(out, split, *args)

    real = digits_coco._write_split
    monkeypatch.setattr(digits_coco, "_write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        make_digits_coco(tmp_path / "set", num_train=3, num_val=2)
    assert list(tmp_path.iterdir()) == []  # neither a half set nor its temporary folder


def test_digits_coco_never_overwrites_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DetectionDataError, match="not a digits COCO set"):
        make_digits_coco(tmp_path / "mine", num_train=2, num_val=2)


def test_detection_data_layer_imports_only_data_and_libraries():
    """The data and evaluation files of detection -> data, never models/train/cli; third-party: torch,
    torchvision, pycocotools, numpy, PIL (the model files may import models and interop: tests/test_layout.py)."""
    allowed = {"torch", "torchvision", "pycocotools", "numpy", "PIL", "sklearn"}
    package = Path(__file__).parents[1] / "src" / "revvit" / "detection"
    for path in [package / f"{name}.py" for name in ("coco", "transforms", "evaluate", "digits_coco")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 or (node.module or "").split(".")[0] == "data", (path.name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in allowed or top == "__future__" or _stdlib(top), (path.name, name)


def _stdlib(name):
    import sys
    return name in sys.stdlib_module_names


def test_no_warning_for_clean_data(coco_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(coco_root, "val")
        ds[0]


def test_batches_feed_torchvision_mask_rcnn_and_its_outputs_evaluate(tmp_path):
    """The seam the detector builds on: a DataLoader batch trains a (tiny) MaskRCNN, its eval outputs evaluate."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    root = make_digits_coco(tmp_path / "digits", num_train=4, num_val=3, canvas=48, digit_size=(10, 24))
    train = CocoDetection(root, "train", detection_train_transform(lsj_size=48))
    val = CocoDetection(root, "val")
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=8, padding=1), torch.nn.ReLU())
    backbone.out_channels = 8
    torch.manual_seed(0)
    k = train.categories.num_classes
    model = MaskRCNN(backbone, min_size=48, max_size=48, box_detections_per_img=20,  # heads kept tiny: fast on CPU
                     rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
                     box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                     box_head=TwoMLPHead(8 * 7 * 7, 32), box_predictor=FastRCNNPredictor(32, k),
                     mask_head=MaskRCNNHeads(8, [16], 1), mask_predictor=MaskRCNNPredictor(16, 16, k))
    images, targets = next(iter(torch.utils.data.DataLoader(train, batch_size=4, collate_fn=detection_collate)))
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert set(losses) >= {"loss_mask", "loss_classifier"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        images, targets = detection_collate([val[i] for i in range(len(val))])
        outputs = model(images)
    res = coco_evaluate({t["image_id"]: o for t, o in zip(targets, outputs)}, val.coco)
    assert set(res.metrics) == {"bbox", "segm"} and 0 <= res.metrics["segm"]["AP"] <= 100
