"""Building blocks shared by the model families."""
from .attention import Attention
from .classifier import TokenClassifierMixin
from .mlp import Mlp
from .patch_embed import PatchEmbed, check_image_input
from .patch_embed3d import PatchEmbed3d, check_video_input
from .pooling_attention import PoolingAttention, pooled_grid

__all__ = ["Attention", "Mlp", "PatchEmbed", "PatchEmbed3d", "PoolingAttention", "TokenClassifierMixin",
           "check_image_input", "check_video_input", "pooled_grid"]
