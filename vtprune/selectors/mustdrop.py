"""MustDrop's vision-encoding stage: local spatial merge of similar non-overlapping windows.

MustDrop (Liu et al. 2024, arXiv 2411.10803, "Multi-Stage Vision Token Dropping"); the computation follows
ModelTC/LightCompress @ 9701d03 ``llmc/compression/token_reduction/mustdrop.py`` L28-181 (``conditional_pooling``,
``merge_wavg``), itself the ``local_merge.py`` of the authors' repository liuting20/MustDrop @ 909afa5.

The patch grid is tiled by non-overlapping ``wh x ww`` windows (row-major over windows, raster order inside a
window). A window's score is the mean pairwise cosine similarity of its tokens (self-pairs excluded). The ``r``
highest-scoring windows each become one token; every other token stays as it is.

The prefilling stage (:func:`dual_attention_keep` and the key set) follows the authors' own code,
``llava/model/language_model/modelling_sparse_llama.py`` L336-354 (``dual_attention_filter``) and
``multimodal_encoder/clip_encoder.py`` L97-107 (the key set: :func:`key_set_count` tokens picked by
:func:`~vtprune.selectors.cls_attention.topk_select`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["WindowMerge", "window_scores", "windows_for_budget", "threshold_windows", "mustdrop_merge",
           "dual_attention_keep", "key_set_count"]


@dataclass(frozen=True)
class WindowMerge:
    """The result of the spatial merge of one grid of ``N`` tokens.

    ``windows``  LongTensor[r, w]: token indices of each merged window (raster order inside it), windows in
                 descending score (the official merged-token order)
    ``dst``      LongTensor[r]: the window's last token (bottom-right), the official destination of the merge
    ``keep``     LongTensor[N - r * w]: the tokens outside the merged windows, ascending
    ``weights``  Tensor[r, N] float32: merged token j = sum_i weights[j, i] * token i (1/w on its window)
    ``merged``   Tensor[r, C]: the merged tokens (mean of their window), in the input's dtype
    """

    windows: torch.Tensor
    dst: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor
    merged: torch.Tensor


def _window_index(height: int, width: int, window: tuple[int, int], device) -> torch.Tensor:
    """LongTensor[W, wh * ww]: token indices of every full window of a ``height x width`` raster grid, windows
    row-major; rows / columns past the last full window (grid not divisible by the window) belong to none."""
    wh, ww = window
    gh, gw = height // wh, width // ww
    grid = torch.arange(height * width, device=device).reshape(height, width)[: gh * wh, : gw * ww]
    # [gh*wh, gw*ww] -> [gh, wh, gw, ww] -> [gh, gw, wh, ww] -> [W, wh*ww]
    return grid.reshape(gh, wh, gw, ww).permute(0, 2, 1, 3).reshape(gh * gw, wh * ww)


def window_scores(features: torch.Tensor, height: int, width: int,
                  window: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows LongTensor[W, w], scores [W]): the full windows of the grid and their mean pairwise cosine
    similarity (``w (w - 1)`` off-diagonal pairs), computed in float32 as ``F.cosine_similarity``."""
    n = features.shape[0]
    if height * width != n:
        raise ValueError(f"a {height}x{width} grid has {height * width} tokens, got {n} features")
    windows = _window_index(height, width, window, features.device)
    w = windows.shape[1]
    if windows.shape[0] == 0 or w < 2:
        return windows, features.new_zeros(windows.shape[0], dtype=torch.float32)
    tiles = features.float()[windows]  # [W, w, C]
    sims = F.cosine_similarity(tiles.unsqueeze(2), tiles.unsqueeze(1), dim=-1)  # [W, w, w]
    sims = sims * (1 - torch.eye(w, device=sims.device))
    return windows, sims.sum((-1, -2)) / (w * (w - 1))


def windows_for_budget(num_tokens: int, k: int, window: tuple[int, int]) -> int:
    """Windows to merge so that at most ``k`` of ``num_tokens`` remain: ``ceil((N - k) / (w - 1))`` (each merge
    removes ``w - 1`` tokens), 0 when ``k >= N``. Not capped: the caller checks it against the windows there are."""
    w = window[0] * window[1]
    if k >= num_tokens or w < 2:
        return 0
    return math.ceil((num_tokens - k) / (w - 1))


def threshold_windows(scores: torch.Tensor, threshold: float) -> int:
    """The official adaptive count: windows whose score is at least ``threshold``."""
    return int((scores >= threshold).sum())


def mustdrop_merge(features: torch.Tensor, windows: torch.Tensor, scores: torch.Tensor, r: int) -> WindowMerge:
    """Merge the ``r`` top-scoring ``windows`` (from :func:`window_scores`) of ``features [N, C]``: each
    becomes the mean of its tokens (the official size-weighted average with unit sizes); ties in the score go
    to the earlier window."""
    n, device = features.shape[0], features.device
    if not 0 <= r <= windows.shape[0]:
        raise ValueError(f"cannot merge {r} windows of {windows.shape[0]}")
    order = torch.argsort(scores, descending=True, stable=True)[:r]
    chosen = windows[order]  # [r, w]
    w = windows.shape[1]
    dropped = torch.zeros(n, dtype=torch.bool, device=device)
    dropped[chosen.flatten()] = True
    keep = torch.nonzero(~dropped).flatten()
    weights = torch.zeros(r, n, dtype=torch.float32, device=device)
    weights.scatter_(1, chosen, 1.0 / w)
    merged = features.float()[chosen].mean(dim=1).to(features.dtype)  # [r, C]
    return WindowMerge(windows=chosen, dst=chosen[:, -1], keep=keep, weights=weights, merged=merged)


def dual_attention_keep(attention: torch.Tensor, global_thr: float, individual_thr: float) -> torch.Tensor:
    """BoolTensor[V]: the visual tokens the dual-attention filter keeps, from ``attention`` [T, V] (float32: the
    head-mean softmax attention of T text queries to the V visual tokens, each row over the query's whole causal
    row). A token is dropped when its attention summed over the queries is below ``global_thr`` times the sum over
    all V tokens AND its largest attention from a single query is below ``individual_thr``."""
    attention = attention.float()
    total = attention.sum(dim=0)  # [V] global attention
    dropped = (total < total.sum() * global_thr) & (attention.max(dim=0).values < individual_thr)
    return ~dropped


def key_set_count(num_tokens: int, ratio: float) -> int:
    """The official key-set size: ``ceil(ratio * N)`` of the image's N tokens (0.08 * 576 -> 47)."""
    return min(num_tokens, math.ceil(ratio * num_tokens))
