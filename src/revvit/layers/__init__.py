"""Building blocks shared by the model families."""
from .attention import Attention
from .mlp import Mlp
from .patch_embed import PatchEmbed, check_image_input

__all__ = ["Attention", "Mlp", "PatchEmbed", "check_image_input"]
