"""DART — duplication-aware token reduction (Wen et al., 2025, arXiv 2502.11494). Pure tensor code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pick_pivots(key_norms: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` tokens with the largest key norm, ascending. ``key_norms`` [N]."""
    count = min(count, key_norms.numel())
    return torch.sort(torch.topk(key_norms, count, sorted=True).indices).values


def dart_select(
    visual_features: torch.Tensor,
    visual_key_norms: torch.Tensor,
    pivot_features: torch.Tensor,
    k: int,
    visual_pivots: int = 4,
) -> torch.Tensor:
    """Keep ``k`` of N visual tokens: pivots plus, for each pivot in turn, the tokens least duplicated by it.

    ``visual_features``  [N, D]  features the duplication is measured on (DART: decoder hidden after the
                                 final norm)
    ``visual_key_norms`` [N]     pivot criterion of each visual token (DART: L1 norm of its key states)
    ``pivot_features``   [P, D]  features of the extra (text) pivots, may be empty
    ``k``                number of visual tokens to keep (0 < k ≤ N)
    ``visual_pivots``    how many visual tokens become pivots (kept themselves)

    The pivots are the ``visual_pivots`` visual tokens with the largest key norm, followed by the text pivots.
    The remaining k − (visual pivots) slots are shared evenly over all pivots (the first pivots take the
    remainder); pivot p adds the not-yet-chosen visual tokens with the lowest cosine similarity to it.
    Returns the kept indices (into N), ascending; exactly ``min(k, N)`` of them.
    """
    n = visual_features.shape[0]
    k = min(k, n)
    chosen = torch.zeros(n, dtype=torch.bool, device=visual_features.device)
    own = pick_pivots(visual_key_norms, min(visual_pivots, k))
    chosen[own] = True
    pivots = torch.cat([visual_features[own], pivot_features.to(visual_features)])  # [P, D]
    remaining = k - own.numel()
    if remaining > 0 and pivots.shape[0]:
        # similarity of every pivot to every visual token, [P, N]
        similarity = F.normalize(pivots.float(), dim=-1) @ F.normalize(visual_features.float(), dim=-1).T
        base, extra = divmod(remaining, pivots.shape[0])
        for p in range(pivots.shape[0]):
            take = base + (1 if p < extra else 0)
            if take == 0:
                continue
            candidate_similarity = similarity[p].masked_fill(chosen, float("inf"))
            picked = torch.topk(candidate_similarity, take, largest=False, sorted=True).indices
            chosen[picked] = True
    return torch.nonzero(chosen).flatten()
