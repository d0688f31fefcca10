"""DivPrune core: greedy Max-Min Diversity selection over cosine distances.

DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175, "DivPrune: Diversity-based Visual Token Pruning
for Large Multimodal Models") casts pruning as the Max-Min Diversity Problem over visual tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pairwise_cosine_distance", "divprune_select"]


def _check_features(features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(
            f"features must be a 2-D tensor [N, D], got shape {getattr(features, 'shape', None)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")


def pairwise_cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for all pairs, float32 ``[N, N]`` (DivPrune, arXiv 2503.02175).

    Values are clamped to ``[0, 2]`` and the diagonal is exactly 0. Zero vectors have cosine 0 to
    everything (distance 1).
    """
    _check_features(features)
    unit = F.normalize(features.float(), dim=-1)  # [N, D]
    dist = (1.0 - unit @ unit.T).clamp_(0.0, 2.0)  # [N, N]
    dist.fill_diagonal_(0.0)
    return dist


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (CVPR 2025, arXiv 2503.02175): greedy Max-Min Diversity subset of ``k`` tokens.

    Paper default: keep ~10% of the visual tokens (``threshold_ratio=0.1``); here the caller passes
    ``k``. Distances are ``1 - cosine similarity`` in float32. First pick: the most isolated token
    (largest distance to its nearest *other* token). Then repeatedly add the token whose minimum
    distance to the selected set is largest. A running minimum vector makes each step O(N), so the
    total is O(N^2 D) for the distance matrix + O(N k); ties go to the lowest index and selected
    tokens are never re-picked. (The official implementation recomputes the min over the selected
    rows every step -- O(k^2 N) -- and handles batch size 1 only; up to floating-point ties it picks
    the same tokens, except that it can re-pick a selected token when the rest are exact duplicates.)

    ``features [N, D]`` -> ``[k]`` long, ascending. Runs on detached features, so it works with autograd on
    (training through a pruned model): the kept tokens carry their gradients, the choice itself has none.
    """
    _check_features(features)
    n = features.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    device = features.device
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if k == n:
        return torch.arange(n, dtype=torch.long, device=device)

    dist = pairwise_cosine_distance(features.detach())  # [N, N] float32; a selection has no gradient
    # first pick: largest nearest-other distance (self excluded via +inf on the diagonal)
    nearest_other = dist.clone().fill_diagonal_(float("inf")).min(dim=1).values  # [N]
    idx = torch.argmax(nearest_other).view(1)  # [1]; argmax returns the first max -> lowest index
    selected = torch.empty(k, dtype=torch.long, device=device)
    selected[0] = idx[0]
    min_dist = dist.index_select(0, idx).squeeze(0).clone()  # [N] running min distance to the selected set
    neg_inf = torch.full((1,), float("-inf"), device=device)
    min_dist.index_copy_(0, idx, neg_inf)
    for step in range(1, k):
        idx = torch.argmax(min_dist).view(1)  # stays on device: no host sync per step
        selected[step] = idx[0]
        torch.minimum(min_dist, dist.index_select(0, idx).squeeze(0), out=min_dist)
        min_dist.index_copy_(0, idx, neg_inf)
    keep, _ = torch.sort(selected)
    return keep
