"""SparseVLM — text-guided visual token sparsification (Zhang et al., ICML 2025, arXiv 2410.04417) and
SparseVLM+ (its version 2.0).

Pure tensor pieces, as the official code (Gumpest/SparseVLMs) computes them: rater selection, the rater
scores of v1.5 (head-mean attention) and of v2.0 (attention divided by the RoPE-only logits, top heads),
the choice of the pruned tokens that v1.5 recycles, and the density-peak clustering (DPC-KNN) that merges
them.
"""

from __future__ import annotations

import torch

#: official number of heads SparseVLM+ (v2.0) keeps for its scores
PRIORITY_HEADS = 14
#: official fraction of the pruned tokens v1.5 recycles: int(0.3·n) + 1 of them
RECYCLE_FRACTION = 0.3


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """BoolTensor[T]: the text tokens that rate the visual tokens.

    ``visual_embeds`` [N, D], ``text_embeds`` [T, D] (the LLM's input embeddings; text = the tokens after the
    image). Relevance of text token t = mean over visual rows of softmax_t(visual · textᵀ); raters are the
    tokens whose relevance is strictly above the mean relevance, as in the official code. When none is (all
    relevances equal, e.g. a single text token) the most relevant one rates alone: the official code would
    average over an empty set of raters and get NaN scores.
    """
    if text_embeds.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=text_embeds.device)
    logits = visual_embeds.float() @ text_embeds.float().T  # [N, T]
    relevance = torch.softmax(logits, dim=-1).mean(dim=0)  # [T]
    raters = relevance > relevance.mean()
    if not bool(raters.any()):
        raters[torch.argmax(relevance)] = True
    return raters


def head_mean_scores(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """v1.5 scores [B, L]: the rater rows' softmax attention ``rows`` [B, H, Q, L] averaged over heads, then
    over the raters with ``weight`` [B, Q] (1/#raters on real raters, 0 on padding rows)."""
    return torch.einsum("bq,bql->bl", weight, rows.mean(dim=1))


def debiased_scores(rows: torch.Tensor, rope_logits: torch.Tensor, weight: torch.Tensor, visual: torch.Tensor,
                    heads: int = PRIORITY_HEADS) -> torch.Tensor:
    """v2.0 (SparseVLM+) scores [B, L] (only the ``visual`` columns are meaningful).

    ``rows`` [B, H, Q, L] softmax attention of the rater rows; ``rope_logits`` [B, Q, L] the *raw* attention
    logits (scaled by 1/√dh, no softmax) that all-ones queries and keys get from RoPE alone; ``weight``
    [B, Q] the rater weights; ``visual`` [B, L] bool. Attention gravity correction: ``rows / rope_logits``;
    priority heads: the ``heads`` heads with the largest sum of corrected attention from the raters to the
    visual tokens (all heads if the model has fewer); score = mean over those heads, then over the raters.
    """
    corrected = rows / rope_logits.unsqueeze(1)  # [B, H, Q, L]
    corrected = torch.where(visual[:, None, None, :], corrected, torch.zeros((), device=rows.device))
    present = (weight > 0).to(corrected.dtype)  # the official sums (not averages) over the raters
    mass = torch.einsum("bq,bhql->bh", present, corrected)  # [B, H]
    chosen = torch.topk(mass, min(heads, mass.shape[1]), dim=-1).indices  # [B, h]
    picked = corrected.gather(1, chosen[:, :, None, None].expand(-1, -1, *corrected.shape[2:]))
    return torch.einsum("bq,bql->bl", weight, picked.mean(dim=1))


def recycled_tokens(dropped_scores: torch.Tensor, fraction: float = RECYCLE_FRACTION) -> torch.Tensor:
    """Indices (into the dropped tokens, in their sequence order) of the int(fraction·n) + 1 dropped tokens
    with the highest scores, in descending score order (the order the official code clusters them in)."""
    n = dropped_scores.numel()
    count = min(n, int(n * fraction) + 1)
    return torch.topk(dropped_scores, count).indices


def dpc_knn(features: torch.Tensor, num_clusters: int, knn: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN, TCFormer), as SparseVLM runs it.

    ``features`` [n, D]. Distances are Euclidean / √D. Density ρᵢ = exp(−mean of the squared distances to
    the ``knn`` nearest points, the point itself included; default ``knn`` = ``num_clusters``, as in the
    official code); δᵢ = distance to the nearest denser point (the densest point: the largest distance of
    all); the ``num_clusters`` points with the largest ρ·δ are the centres; every point joins its nearest
    centre, each centre its own cluster. Exactly equal densities are ordered by index (the official code
    adds uniform noise of 1e-6 to the densities instead, which is not deterministic).
    Returns (centre indices [c] in descending ρ·δ order — the order of the merged tokens —, assignment [n]
    in 0..c-1).
    """
    n = features.shape[0]
    num_clusters = max(1, min(num_clusters, n))
    knn = num_clusters if knn is None else max(1, min(knn, n))
    x = features.float()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / (x.shape[1] ** 0.5)  # [n, n]
    nearest = torch.topk(distance, knn, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    index = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))  # [i, j]: j denser than i
    delta = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = torch.topk(delta * density, num_clusters).indices
    assignment = distance[centres].argmin(dim=0)
    assignment[centres] = torch.arange(num_clusters, device=x.device)
    return centres, assignment


def cluster_means(features: torch.Tensor, assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """[c, D] mean of the features assigned to each cluster."""
    sums = features.new_zeros(num_clusters, features.shape[1]).index_add_(0, assignment, features)
    counts = torch.bincount(assignment, minlength=num_clusters).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def recycle(features: torch.Tensor, scores: torch.Tensor, fraction: float = RECYCLE_FRACTION) -> torch.Tensor:
    """SparseVLM v1.5's token recycling. ``features`` [n, D] / ``scores`` [n]: the dropped visual tokens (in
    sequence order) and their rater scores. The int(fraction·n) + 1 best-scored are clustered (DPC-KNN) into
    int(m/10) + 1 clusters; returns their means [c, D] in the official order (descending ρ·δ of the centre)."""
    chosen = features[recycled_tokens(scores, fraction)]
    clusters = chosen.shape[0] // 10 + 1
    centres, assignment = dpc_knn(chosen, clusters)
    return cluster_means(chosen, assignment, centres.numel())
