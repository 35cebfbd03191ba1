"""revvit: Reversible Vision Transformers with reversible backprop.

`import revvit` registers the models with timm: `timm.create_model("rev_vit_small_patch16_224")`.
"""
from . import models  # noqa: F401  (registers every revvit model with timm)
from .interop import load, load_slowfast, save
from .models import MViT, RevMViT, RevViT, RevViTConfig
from .reversible import ReversibleBlock, ReversibleStack

__version__ = "0.1.0"
__all__ = ["RevViT", "RevViTConfig", "RevMViT", "MViT", "ReversibleBlock", "ReversibleStack", "load",
           "load_slowfast", "save"]
