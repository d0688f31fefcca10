"""DART — duplication-aware token reduction (Wen et al., 2025, arXiv 2502.11494). Pure tensor code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pick_pivots(key_norms: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` tokens with the largest key norm, largest first (``torch.topk`` order, the
    order in which the official code inserts its pivots). ``key_norms`` [N]."""
    count = min(count, key_norms.numel())
    return torch.topk(key_norms, count, sorted=True).indices


def set_iteration_order(positions: list[int]) -> list[int]:
    """The order in which the official code visits its pivots: it puts their sequence positions (ints, image
    pivots first, then text pivots, each in ``topk`` order) into a Python ``set`` and iterates it. Returns
    indices into ``positions`` in that order, obtained by building the same set: CPython hashes an int to
    itself and does not randomise int hashes, so the order is deterministic — for 8 pivots the table has 32
    slots and the pivots come out by ascending position modulo 32 (collisions resolved by CPython's
    probing, which depends on the insertion order). ``positions`` must be distinct."""
    where = {p: i for i, p in enumerate(positions)}
    if len(where) != len(positions):
        raise ValueError("pivot positions must be distinct")
    return [where[p] for p in set(positions)]


def dart_select(
    visual_features: torch.Tensor,
    visual_key_norms: torch.Tensor,
    pivot_features: torch.Tensor,
    k: int,
    visual_pivots: int = 4,
    visual_positions: torch.Tensor | None = None,
    pivot_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep ``k`` of N visual tokens: pivots plus, for each pivot in turn, the tokens least duplicated by it.

    ``visual_features``  [N, D]  features the duplication is measured on (DART: decoder hidden after the
                                 final norm)
    ``visual_key_norms`` [N]     pivot criterion of each visual token (DART: L1 norm of its key states)
    ``pivot_features``   [P, D]  features of the extra (text) pivots, may be empty, in ``topk`` order
    ``k``                number of visual tokens to keep (0 < k ≤ N)
    ``visual_pivots``    how many visual tokens become pivots (kept themselves)
    ``visual_positions`` [N] / ``pivot_positions`` [P]: sequence positions of the visual tokens and of the
                         text pivots; given, the pivots are visited in the official (Python set) order of
                         :func:`set_iteration_order`, else in list order (visual pivots, then text pivots)

    The visual pivots are the ``visual_pivots`` visual tokens with the largest key norm. The remaining
    k − (visual pivots) slots are shared evenly over all pivots in visiting order — the official count
    ``visual_pivots + pivots × TOKEN_TOPK`` gives each pivot exactly TOKEN_TOPK; any other k gives the
    remainder to the first pivots visited. Pivot p adds the not-yet-chosen visual tokens with the lowest
    cosine similarity (``F.cosine_similarity``, as the official code) to it.
    Returns the kept indices (into N), ascending; exactly ``min(k, N)`` of them.
    """
    n = visual_features.shape[0]
    k = min(k, n)
    chosen = torch.zeros(n, dtype=torch.bool, device=visual_features.device)
    own = pick_pivots(visual_key_norms, min(visual_pivots, k))
    chosen[own] = True
    pivots = torch.cat([visual_features[own], pivot_features.to(visual_features)])  # [P, D]
    order = list(range(pivots.shape[0]))
    if visual_positions is not None and pivot_positions is not None:
        order = set_iteration_order(visual_positions[own].tolist() + pivot_positions.tolist())
    remaining = k - own.numel()
    if remaining > 0 and pivots.shape[0]:
        candidates = visual_features.float()
        base, extra = divmod(remaining, pivots.shape[0])
        for rank, p in enumerate(order):
            take = min(base + (1 if rank < extra else 0), n - int(chosen.sum()))
            if take <= 0:
                continue
            similarity = F.cosine_similarity(pivots[p].float().unsqueeze(0), candidates, dim=-1)  # [N]
            picked = torch.topk(-similarity.masked_fill(chosen, float("inf")), take, sorted=True).indices
            chosen[picked] = True
    return torch.nonzero(chosen).flatten()
