"""revvit: Reversible Vision Transformers with reversible backprop.

`import revvit` registers the models with timm: `timm.create_model("rev_vit_small_patch16_224")`.
"""
from . import models
from .models import RevViT, RevViTConfig
from .reversible import ReversibleBlock, ReversibleStack
from .interop import load, load_slowfast, save  # noqa: E402  (official checkpoints, safetensors)

__version__ = "0.1.0"
__all__ = ["RevViT", "RevViTConfig", "ReversibleBlock", "ReversibleStack"]
