"""Patch embeddings: images (B, C, H, W) -> tokens (B, N, D), with input checks that say what is expected."""
from __future__ import annotations

from typing import Sequence

from timm.layers import to_2tuple
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping Conv2d patches: (B, in_chans, H, W) -> (B, H/p * W/p, embed_dim).

    The input size is fixed at construction (the position embedding depends on it); a wrong size or
    channel count raises a ValueError naming what the model expects.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int | Sequence[int] = 16,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        check_image_input(x, self.in_chans, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def check_image_input(x: Tensor, in_chans: int, img_size: tuple[int, int]) -> None:
    """Raise a ValueError that names the expected (B, C, H, W) when `x` does not fit."""
    expected = f"(batch, {in_chans}, {img_size[0]}, {img_size[1]})"
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape {expected}, got a {x.ndim}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels {expected}, got {x.shape[1]} (shape "
                         f"{tuple(x.shape)}); create the model with in_chans={x.shape[1]} or convert the input")
    if tuple(x.shape[2:]) != tuple(img_size):
        raise ValueError(f"expected images of size {img_size[0]}x{img_size[1]} {expected}, got "
                         f"{x.shape[2]}x{x.shape[3]}; resize the input or create the model with "
                         f"img_size={x.shape[2]}")
