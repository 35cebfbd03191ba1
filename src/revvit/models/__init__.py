"""Model families; importing this module registers every revvit model in timm's registry."""
from . import mvit, vit  # noqa: F401  (registration with timm is the import side effect)
from .mvit import MViT, MViTConfig, RevMViT
from .vit import RevViT, RevViTConfig

__all__ = ["MViT", "MViTConfig", "RevMViT", "RevViT", "RevViTConfig"]
