"""Pure tensor cores of the visual-token selectors (no model classes)."""

from .baselines import PooledTokens, pool_grid, random_select, uniform_grid_select
from .cls_attention import cls_attention_scores, mean_received_attention, softmax_attention_rows, topk_select
from .divprune import divprune_select, pairwise_cosine_distance
from .visionzip import DROPPED, VisionZipResult, split_visionzip_budget, visionzip_select

__all__ = [
    "DROPPED",
    "PooledTokens",
    "VisionZipResult",
    "cls_attention_scores",
    "divprune_select",
    "mean_received_attention",
    "pairwise_cosine_distance",
    "pool_grid",
    "random_select",
    "softmax_attention_rows",
    "split_visionzip_budget",
    "topk_select",
    "uniform_grid_select",
    "visionzip_select",
]
