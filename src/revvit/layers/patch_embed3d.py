"""Overlapping convolutional patch embedding for video (Conv3d) or images (Conv2d), MViT's stem.

Video (B, C, T, H, W) or images (B, C, H, W) -> tokens (B, T'*H'*W', D) with T' slowest, plus the token
grid (T', H', W') (images: T' = 1). The input size is fixed at construction, since the position
embeddings and every pooling layer's grid depend on it; a wrong input raises a ValueError naming the
expected shape. With `dynamic_img_size` any frame count and frame size is taken and the grid returned is
the input's (the model resamples its position embeddings and pools on that grid).
"""
from __future__ import annotations

from typing import Sequence

from timm.layers import to_2tuple, to_ntuple
from torch import Tensor, nn

from .pooling_attention import Grid


def _ntuple(x: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """timm's to_ntuple, plus the length check it does not make (a wrong length would fail deep in a conv)."""
    x = to_ntuple(n)(x)
    if len(x) != n:
        raise ValueError(f"patch {what} needs {n} values for a {'2' if n == 2 else '3'}-D stem, got {x}")
    return x


def patch_grid(img_size: int | Sequence[int], num_frames: int, kernel: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], conv_2d: bool) -> Grid:
    """The token grid (T', H', W') of the stem on (num_frames, H, W) input, without building it."""
    n = 2 if conv_2d else 3
    kernel, stride, padding = (_ntuple(v, n, w) for v, w in ((kernel, "kernel"), (stride, "stride"),
                                                              (padding, "padding")))
    if conv_2d:
        if num_frames != 1:
            raise ValueError(f"a 2-D patch embedding takes images (num_frames=1), got num_frames={num_frames}")
        kernel, stride, padding = (1,) + kernel, (1,) + stride, (0,) + padding
    sizes = (int(num_frames),) + to_2tuple(img_size)
    grid = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(sizes, kernel, stride, padding))
    if min(grid) < 1:
        raise ValueError(f"input {sizes} is too small for a patch kernel {kernel} with padding {padding}")
    return grid  # type: ignore[return-value]


class PatchEmbed3d(nn.Module):
    """Conv patch embedding: `proj` is Conv3d (video) or, with `conv_2d`, Conv2d (images, T = 1).

    kernel/stride/padding are (t, h, w) triples for Conv3d and (h, w) pairs for Conv2d. A Conv3d model
    made for one frame also takes images (B, C, H, W); a Conv2d model also takes one-frame clips.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, num_frames: int = 1, in_chans: int = 3,
                 embed_dim: int = 96, kernel: Sequence[int] = (3, 7, 7), stride: Sequence[int] = (2, 4, 4),
                 padding: Sequence[int] = (1, 3, 3), conv_2d: bool = False, dynamic_img_size: bool = False):
        super().__init__()
        self.dynamic_img_size = dynamic_img_size
        self.grid_size: Grid = patch_grid(img_size, num_frames, kernel, stride, padding, conv_2d)
        self.img_size = to_2tuple(img_size)
        self.num_frames = int(num_frames)
        self.in_chans = in_chans
        self.conv_2d = conv_2d
        n = 2 if conv_2d else 3
        kernel, stride, padding = to_ntuple(n)(kernel), to_ntuple(n)(stride), to_ntuple(n)(padding)
        conv = nn.Conv2d if conv_2d else nn.Conv3d
        self.proj = conv(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.stride: tuple[int, int, int] = (1,) + stride if conv_2d else stride  # type: ignore[assignment]
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        """(B, C, [T,] H, W) -> tokens (B, N, D) and their grid (T', H', W')."""
        if self.dynamic_img_size:
            check_video_input(x, self.in_chans, x.shape[2] if x.ndim == 5 else 1, tuple(x.shape[-2:]))
        else:
            check_video_input(x, self.in_chans, self.num_frames, self.img_size)
        if self.conv_2d and x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"a 2-D patch embedding takes images or one-frame clips, got shape {tuple(x.shape)}")
            x = x.squeeze(2)
        elif not self.conv_2d and x.ndim == 4:
            x = x.unsqueeze(2)
        x = self.proj(x)
        grid = self.grid_size if not self.dynamic_img_size else (1,) * (5 - x.ndim) + tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]


def check_video_input(x: Tensor, in_chans: int, num_frames: int, img_size: tuple[int, int]) -> None:
    """Raise a ValueError naming the expected shape when `x` is neither (B, C, T, H, W) nor, for T = 1,
    (B, C, H, W)."""
    h, w = img_size
    clip = f"(batch, {in_chans}, {num_frames}, {h}, {w})"
    expected = f"images (batch, {in_chans}, {h}, {w}) or clips {clip}" if num_frames == 1 else f"clips {clip}"
    got = f"got shape {tuple(x.shape)}"
    if x.ndim not in (4, 5):
        raise ValueError(f"expected {expected}, {got}")
    if x.ndim == 4 and num_frames != 1:
        raise ValueError(f"expected {expected}, {got}: this model takes {num_frames}-frame clips; create it "
                         f"with num_frames=1 for images")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, {expected}, {got}; create the model with "
                         f"in_chans={x.shape[1]} or convert the input")
    if x.ndim == 5 and x.shape[2] != num_frames:
        raise ValueError(f"expected {num_frames} frames, {expected}, {got}; sample {num_frames} frames or "
                         f"create the model with num_frames={x.shape[2]}")
    if tuple(x.shape[-2:]) != (h, w):
        raise ValueError(f"expected frames of size {h}x{w}, {expected}, {got}; resize the input or create "
                         f"the model with img_size={x.shape[-2]}, or with dynamic_img_size=True to take any size")
