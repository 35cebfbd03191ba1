"""Model families; importing this module registers every revvit model in timm's registry."""
from ..reversible import BACKPROP_MODES, ReversibleStack
from . import mvit, vit  # noqa: F401  (registration with timm is the import side effect)
from .mvit import MViT, MViTConfig, RevMViT
from .vit import RevViT, RevViTConfig

__all__ = ["MViT", "MViTConfig", "RevMViT", "RevViT", "RevViTConfig", "set_backprop"]


def set_backprop(module, mode: str):
    """Set the backprop mode ("reversible", "parallel", "autograd") of every reversible model or stack inside
    `module` (a Rev-ViT, a Rev-MViT, a detector holding one, ...); returns `module`. Non-reversible models
    (MViT) are left alone."""
    if mode not in BACKPROP_MODES:
        raise ValueError(f"backprop mode must be one of {BACKPROP_MODES}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, (RevViT, RevMViT, ReversibleStack)):
            m.set_backprop(mode)
    return module
