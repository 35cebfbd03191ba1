"""Peak activation memory of one Mask R-CNN training step, reversible vs autograd backbone vs the MViT twin
(`revvit bench --family detection`; the paper: about 1.7x less with Rev-MViT-B on COCO).

The detector is built by the caller (`build(backbone_name, backprop)`: the CLI passes
`revvit.detection.create_detector`), so this module needs nothing of the detection package. What is measured
is the whole training step (backbone, pyramid, RPN, box and mask heads, losses, backward) on synthetic images
of one size with a few boxes and masks each, by `revvit.bench.memory.measure_training_memory`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .memory import measure_training_memory

__all__ = ["DetectionMemoryRow", "detection_memory", "format_detection_table", "DETECTION_CANDIDATES"]

# (label, timm name of the backbone, backprop mode)
DETECTION_CANDIDATES = (("Rev-MViT-B", "rev_mvit_base", "reversible"), ("Rev-MViT-B", "rev_mvit_base", "autograd"),
                        ("MViT-B", "mvit_base", "autograd"))


@dataclass
class DetectionMemoryRow:
    backbone: str
    backprop: str
    mb_per_image: float
    img_size: int
    batch: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def synthetic_targets(batch: int, size: int, per_image: int = 4, seed: int = 0) -> list[dict]:
    """A few boxes with rectangular masks per image: enough positives for every head to run."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.randint(0, size // 2, (per_image, 2), generator=g)
        wh = torch.randint(size // 16, size // 2, (per_image, 2), generator=g)
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1).float()
        masks = torch.zeros(per_image, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = 1
        out.append({"boxes": boxes, "labels": torch.ones(per_image, dtype=torch.int64), "masks": masks})
    return out


class _TrainStep(nn.Module):
    """The detector in train mode on fixed targets, as one module from images (B, 3, H, W) to the summed loss."""

    def __init__(self, det: nn.Module, targets: list[dict]):
        super().__init__()
        self.det, self.targets = det, targets

    def forward(self, x: Tensor) -> Tensor:
        return sum(self.det(list(x), self.targets).values())


def detection_memory(build: Callable[[str, str], nn.Module], img_size: int = 512, batch: int = 1,
                     device: Optional[str] = None, candidates: Sequence[tuple[str, str, str]] = DETECTION_CANDIDATES,
                     log: Callable[[str], None] = print) -> list[DetectionMemoryRow]:
    """Peak activation bytes per image of one training step of each candidate detector (built fresh, seed 0)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(dev)
    targets = [{k: v.to(dev) for k, v in t.items()} for t in synthetic_targets(batch, img_size)]
    rows = []
    for label, name, mode in candidates:
        log(f"measuring {label} ({name}, {mode}) at {img_size}x{img_size}, batch {batch}, {dev.type} ...")
        torch.manual_seed(0)
        step = _TrainStep(build(name, mode), targets).to(dev)
        report = measure_training_memory(step, x, loss_fn=lambda out, _t: out)
        rows.append(DetectionMemoryRow(label, mode, report.mb_per_sample, img_size, batch, dev.type))
        del step
    return rows


def format_detection_table(rows: Sequence[DetectionMemoryRow]) -> str:
    """The rows as a Markdown table, each against the reversible row's memory."""
    if not rows:
        return ""
    base = next((r.mb_per_image for r in rows if r.backprop == "reversible"), None)
    r0 = rows[0]
    lines = [f"Mask R-CNN training step, {r0.img_size}x{r0.img_size}, batch {r0.batch}, {r0.device}: peak activation "
             "memory per image", "", "| backbone | backprop | MB / image | vs reversible |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.mb_per_image / base:.2f}x" if base else "-"
        lines.append(f"| {r.backbone} | {r.backprop} | {r.mb_per_image:.1f} | {ratio} |")
    return "\n".join(lines)
