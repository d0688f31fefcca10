"""PruMerge / PruMerge+ cores: IQR outliers of [CLS] attention, spatial supplement, key-similarity merge.

LLaVA-PruMerge (Shang et al., ICCV 2025, arXiv 2403.15388, "LLaVA-PruMerge: Adaptive Token Reduction for
Efficient Large Multimodal Models"; official code 42Shawn/LLaVA-PruMerge @ 097c041,
``llava/model/multimodal_encoder/clip_encoder.py`` L34-47 ``outlier_dectection``, L85-171
``token_prune_merge_advanced`` (PruMerge), L174-281 ``token_prune_merge_advanced_plus`` (PruMerge+)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["iqr_outlier_count", "prumerge_indices", "prumerge_merge", "PruMergeResult", "NEIGHBOURS"]

#: tokens merged into each kept token (``topk(..., k=int(32))`` in the official code)
NEIGHBOURS = 32


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """Number of ``scores`` above ``Q3 + 1.5 * IQR`` (quartiles with linear interpolation, numpy's default), i.e.
    the official ``int(N * ratio)`` with ``ratio = outliers / N``."""
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    values = scores.detach().double()
    q1, q3 = torch.quantile(values, 0.25), torch.quantile(values, 0.75)
    count = int((values > q3 + 1.5 * (q3 - q1)).sum())
    n = values.numel()
    return int(n * (count / n))  # the official expression (float rounding included)


def prumerge_indices(scores: torch.Tensor, outliers: int, plus: bool, budget: int | None = None) -> torch.Tensor:
    """Kept indices in the official order: the ``outliers`` top tokens by ``scores`` (descending), then for
    PruMerge+ the spatial supplement in ascending order.

    ``budget=None`` (the official adaptive mode): PruMerge+ adds ``arange(0, N - 1, int(int(1 / ratio) / 3))``
    (``ratio = outliers / N``) minus the tokens already kept. With a ``budget`` of kept tokens (the extra
    token not counted): PruMerge keeps the top ``budget``; PruMerge+ keeps ``min(outliers, budget)`` outliers
    and fills the rest with tokens spread evenly over the remaining indices (ascending).
    """
    n = scores.shape[0]
    order = torch.sort(scores.detach().float(), descending=True, stable=True).indices  # [N]
    if budget is not None and not plus:
        return order[:budget]
    top = order[: outliers if budget is None else min(outliers, budget)]
    if not plus:
        return top
    taken = torch.zeros(n, dtype=torch.bool, device=scores.device)
    taken[top] = True
    if budget is None:
        if outliers == 0:
            return top
        spacing = max(1, int(int(1 / (outliers / n)) / 3))
        grid = torch.arange(0, n - 1, spacing, device=scores.device)
        supplement = grid[~taken[grid]]
    else:
        free = torch.nonzero(~taken).flatten()  # ascending
        want = min(budget - top.numel(), free.numel())
        supplement = free[(torch.arange(want, device=scores.device) * free.numel()) // max(want, 1)]
    return torch.cat([top, supplement])


@dataclass(frozen=True)
class PruMergeResult:
    """``merged [m + 1, C]``: each kept token updated, then the extra token; ``weights [m + 1, N]`` how each
    combines the input tokens (merged = weights @ hidden)."""

    merged: torch.Tensor
    weights: torch.Tensor


def prumerge_merge(hidden: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor,
                   neighbours: int = NEIGHBOURS) -> PruMergeResult:
    """PruMerge's merge step for one image. ``hidden [N, C]`` the features, ``keys [N, Ck]``, ``scores [N]``,
    ``kept [m]`` (any order; the output follows it).

    Each kept token ``i``: the ``neighbours`` tokens (``min(neighbours, N - 1)``) other than ``i`` with the
    most cosine-similar keys, kept or not; ``new_i = x_i + sum_j scores_j * x_j`` over them (weights not
    normalised, as the official code). Extra token: ``sum_j scores_j * x_j`` over the tokens not kept. float32.
    """
    n = hidden.shape[0]
    if keys.shape[0] != n or scores.shape != (n,):
        raise ValueError(f"hidden [N, C], keys [N, Ck] and scores [N] must agree on N, got {tuple(hidden.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(scores.shape)}")
    device = hidden.device
    kept = kept.to(device)
    m = kept.numel()
    unit = F.normalize(keys.detach().float(), dim=-1)  # [N, Ck]
    sim = unit[kept] @ unit.T  # [m, N]
    rows = torch.arange(m, device=device)
    sim[rows, kept] = float("-inf")  # not itself
    near = torch.topk(sim, min(neighbours, n - 1), dim=1).indices  # [m, j]
    attn = scores.detach().float().to(device)
    weights = torch.zeros(m + 1, n, dtype=torch.float32, device=device)
    weights[rows[:, None], near] = attn[near]
    weights[rows, kept] = 1.0
    dropped = torch.ones(n, dtype=torch.bool, device=device)
    dropped[kept] = False
    weights[m] = torch.where(dropped, attn, torch.zeros((), device=device))
    merged = (weights @ hidden.float()).to(hidden.dtype)  # [m + 1, C]
    return PruMergeResult(merged=merged, weights=weights)
