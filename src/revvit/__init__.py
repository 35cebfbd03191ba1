"""revvit: Reversible Vision Transformers with reversible backprop.

`import revvit` registers the models with timm: `timm.create_model("rev_vit_small_patch16_224")`.
"""
__version__ = "0.1.0"  # first: revvit.interop records it in every file it writes

from . import models  # noqa: E402, F401  (registers every revvit model with timm)
from .interop import load, load_slowfast, save  # noqa: E402
from .models import MViT, RevMViT, RevViT, RevViTConfig, set_backprop  # noqa: E402
from .reversible import ReversibleBlock, ReversibleStack  # noqa: E402

__all__ = ["RevViT", "RevViTConfig", "RevMViT", "MViT", "ReversibleBlock", "ReversibleStack", "load",
           "load_slowfast", "save", "set_backprop"]
