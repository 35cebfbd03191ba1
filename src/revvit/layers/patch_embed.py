"""Patch embeddings: images (B, C, H, W) -> tokens (B, N, D), with input checks that say what is expected."""
from __future__ import annotations

from typing import Sequence

from timm.layers import to_2tuple
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping Conv2d patches: (B, in_chans, H, W) -> (B, H/p * W/p, embed_dim).

    The input size is fixed at construction (the position embedding is made for it); a wrong size or
    channel count raises a ValueError naming what the model expects. With `dynamic_img_size` (timm's
    convention) any size the patch size divides is taken; the model then resamples its position
    embedding to the input's grid (`grid_of` gives it).
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int | Sequence[int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, dynamic_img_size: bool = False):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_of(self, x: Tensor) -> tuple[int, int]:
        """The token grid (H/p, W/p) of images `x`."""
        return x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_img_size:
            check_image_input(x, self.in_chans, None, divisor=self.patch_size)
        else:
            check_image_input(x, self.in_chans, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def check_image_input(x: Tensor, in_chans: int, img_size: tuple[int, int] | None,
                      divisor: Sequence[int] = (1, 1)) -> None:
    """Raise a ValueError that names the expected (B, C, H, W) when `x` does not fit: `img_size` (H, W) exactly,
    or (None) any H, W divisible by `divisor`."""
    size = "H, W" if img_size is None else f"{img_size[0]}, {img_size[1]}"
    expected = f"(batch, {in_chans}, {size})"
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape {expected}, got a {x.ndim}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels {expected}, got {x.shape[1]} (shape "
                         f"{tuple(x.shape)}); create the model with in_chans={x.shape[1]} or convert the input")
    if img_size is None:
        if x.shape[2] % divisor[0] or x.shape[3] % divisor[1]:
            raise ValueError(f"expected image sides divisible by {divisor[0]}x{divisor[1]} (the model's stride), "
                             f"got {x.shape[2]}x{x.shape[3]}; pad or resize the input")
        return
    if tuple(x.shape[2:]) != tuple(img_size):
        raise ValueError(f"expected images of size {img_size[0]}x{img_size[1]} {expected}, got "
                         f"{x.shape[2]}x{x.shape[3]}; resize the input or create the model with "
                         f"img_size={x.shape[2]}, or with dynamic_img_size=True to take any size")
