"""HiPrune core: anchors (object-layer attention), their 4-neighbour buffers, registers (deep-layer attention).

HiPrune (arXiv 2508.00553, "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision
Encoders"; official code Danielement321/HiPrune @ 6e83a12, ``LLaVA/llava/model/llava_arch.py`` L140-182,
``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` L1854-1893).
"""

from __future__ import annotations

import torch

__all__ = ["hiprune_select", "anchor_count"]


def anchor_count(k: int, alpha: float) -> int:
    """Anchors for ``k`` kept tokens: ``round(k * alpha / 5)`` (Python rounding, as the official code)."""
    return round(k * alpha / 5)


def hiprune_select(object_scores: torch.Tensor, deep_scores: torch.Tensor, k: int, width: int,
                   anchors: int) -> torch.Tensor:
    """Kept indices (ascending) of HiPrune for one image / crop of ``N`` tokens in raster order.

    ``object_scores [N]`` / ``deep_scores [N]``: attention each token receives in the object layer / the deep
    layer. Anchors: the top ``anchors`` tokens by ``object_scores``; buffers: each anchor's indices ``i ± 1`` and
    ``i ± width``, clamped to ``[0, N - 1]`` (no check for row wrap, as the official code); registers: the top
    ``k - |anchors ∪ buffers|`` of the other tokens by ``deep_scores``. Ties go to the lower index. When the
    anchors and buffers alone exceed ``k`` (the official code then fails), the anchors are lowered until they fit.
    """
    if object_scores.ndim != 1 or deep_scores.shape != object_scores.shape:
        raise ValueError(f"expected object_scores and deep_scores [N], got {tuple(object_scores.shape)} and "
                         f"{tuple(deep_scores.shape)}")
    n = object_scores.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    device = object_scores.device
    if k == n:
        return torch.arange(n, device=device)
    order = torch.sort(object_scores.float(), descending=True, stable=True).indices  # [N]
    for count in range(min(anchors, k), -1, -1):
        top = order[:count]
        near = torch.cat([top, top - 1, top + 1, top - width, top + width]).clamp(0, n - 1)
        chosen = torch.zeros(n, dtype=torch.bool, device=device)
        chosen[near] = True
        if int(chosen.sum()) <= k:
            break
    rest = deep_scores.float().masked_fill(chosen, float("-inf"))
    registers = torch.sort(rest, descending=True, stable=True).indices[: k - int(chosen.sum())]
    chosen[registers] = True
    return torch.nonzero(chosen).flatten()
