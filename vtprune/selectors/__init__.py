"""Pure tensor cores of the visual-token selectors (no model classes)."""

from .baselines import PooledTokens, pool_grid, random_select, uniform_frames, uniform_grid_select
from .cls_attention import cls_attention_scores, mean_received_attention, softmax_attention_rows, topk_select
from .dart import dart_select, pick_pivots
from .divprune import divprune_select, pairwise_cosine_distance
from .sparsevlm import cluster_means, dpc_knn, select_raters
from .visionzip import DROPPED, VisionZipResult, split_visionzip_budget, visionzip_select

__all__ = [
    "DROPPED",
    "PooledTokens",
    "VisionZipResult",
    "cls_attention_scores",
    "cluster_means",
    "dart_select",
    "divprune_select",
    "dpc_knn",
    "mean_received_attention",
    "pairwise_cosine_distance",
    "pick_pivots",
    "pool_grid",
    "random_select",
    "select_raters",
    "softmax_attention_rows",
    "split_visionzip_budget",
    "topk_select",
    "uniform_frames",
    "uniform_grid_select",
    "visionzip_select",
]
