"""Model families; importing this module registers every revvit model in timm's registry."""
from . import vit
from .vit import RevViT, RevViTConfig

__all__ = ["RevViT", "RevViTConfig"]
