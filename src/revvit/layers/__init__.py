"""Building blocks shared by the model families."""
from .attention import Attention, AttentionBranch
from .classifier import TokenClassifierMixin
from .mlp import Mlp, MlpBranch
from .patch_embed import PatchEmbed, check_image_input
from .patch_embed3d import PatchEmbed3d, check_video_input, patch_grid
from .pooling_attention import Grid, PoolingAttention, PoolingAttentionBranch, pooled_grid
from .pos_embed import resample_pos_embed, square_grid
from .stream_norm import mean_tokens, norm_streams

__all__ = ["Attention", "AttentionBranch", "Grid", "Mlp", "MlpBranch", "PatchEmbed", "PatchEmbed3d",
           "PoolingAttention", "PoolingAttentionBranch", "TokenClassifierMixin", "check_image_input",
           "check_video_input", "mean_tokens", "norm_streams", "patch_grid", "pooled_grid", "resample_pos_embed",
           "square_grid"]
