"""Model families; importing this module registers every revvit model in timm's registry."""
from . import mvit, vit
from .mvit import MViT, MViTConfig, RevMViT
from .vit import RevViT, RevViTConfig

__all__ = ["MViT", "MViTConfig", "RevMViT", "RevViT", "RevViTConfig"]
