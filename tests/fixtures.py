"""Tiny on-disk datasets for tests: PNG class folders, mp4 clips written with PyAV, list files, corrupt files.

Every writer is deterministic (seeded) and returns the path it wrote, so a test reads:

    root = write_image_folder(tmp_path / "imgs", ["cat", "dog"], per_class=3)
    lists = write_video_list(tmp_path / "vids", num_classes=2, per_class=2)
    write_corrupt(root / "train" / "cat" / "broken.png")
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image

__all__ = ["write_image_folder", "write_video", "write_video_list", "write_corrupt", "class_colour"]


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class index, so fixture classes are separable by colour alone."""
    rng = np.random.default_rng(1000 + index)
    return tuple(int(v) for v in rng.integers(40, 216, size=3))


def write_image_folder(
    root: str | Path,
    classes: Sequence[str],
    per_class: int,
    size: int = 32,
    splits: Sequence[str] = ("train", "val"),
    seed: int = 0,
    ext: str = "png",
) -> Path:
    """Write `root/<split>/<class>/<i>.<ext>`: RGB size×size images, the class colour plus noise."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(-30, 31, size=(size, size, 3))
                pixels = np.clip(np.array(class_colour(ci)) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
    return root


def write_video(
    path: str | Path,
    frames: int | np.ndarray = 16,
    size: int | tuple[int, int] = 32,
    fps: int = 8,
    codec: str = "mpeg4",
    colour: tuple[int, int, int] = (200, 60, 60),
    seed: int = 0,
) -> Path:
    """Write an mp4 with PyAV. `frames`: a count (a `colour` square moving left to right on noise)
    or a uint8 array (T, H, W, 3). `size`: side or (H, W), even numbers (yuv420p)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(frames, int):
        h, w = (size, size) if isinstance(size, int) else size
        rng = np.random.default_rng(seed)
        clip = rng.integers(0, 40, size=(frames, h, w, 3)).astype(np.uint8)
        side = max(2, min(h, w) // 3)
        for t in range(frames):
            x = int((w - side) * t / max(frames - 1, 1))
            clip[t, (h - side) // 2:(h + side) // 2, x:x + side] = colour
        frames = clip
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video_list(
    root: str | Path,
    num_classes: int = 2,
    per_class: int = 2,
    frames: int = 16,
    size: int = 32,
    fmt: str = "csv",
    splits: Sequence[str] = ("train", "val"),
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write clips to `root/videos/` and the list files `root/<split>.<fmt>` (paths relative to root).

    fmt "csv": `videos/x.mp4,label` per line; fmt "txt": `videos/x.mp4 label`. With `class_names`,
    also writes `root/classes.txt` (one name per line, line i = label i). Returns root, the folder
    that `DataSpec(path=root)` takes."""
    root = Path(root)
    sep = "," if fmt == "csv" else " "
    for split in splits:
        lines = []
        for label in range(num_classes):
            for i in range(per_class):
                seed = 7919 * splits.index(split) + 101 * label + i
                rel = f"videos/{split}_{label}_{i}.mp4"
                write_video(root / rel, frames, size, colour=class_colour(label), seed=seed)
                lines.append(f"{rel}{sep}{label}")
        (root / f"{split}.{fmt}").write_text("\n".join(lines) + "\n")
    if class_names is not None:
        (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    return root


def write_corrupt(path: str | Path, nbytes: int = 512, seed: int = 0) -> Path:
    """Write random bytes under any name (e.g. `bad.png`, `bad.mp4`): a file no decoder can read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8).tobytes())
    return path
