"""SparseVLM — text-guided visual token sparsification (Zhang et al., ICML 2025, arXiv 2410.04417).

Pure tensor pieces: rater selection, rater-attention scores, and the density-peak clustering (DPC-KNN)
that v1 uses to recycle pruned tokens.
"""

from __future__ import annotations

import torch


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """BoolTensor[T]: the text tokens that rate the visual tokens.

    ``visual_embeds`` [N, D], ``text_embeds`` [T, D] (the LLM's input embeddings). Relevance of text token t
    = mean over visual rows of softmax_t(visual · textᵀ); raters are the tokens with relevance ≥ the mean
    relevance (at least one token: the most relevant).
    """
    if text_embeds.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=text_embeds.device)
    logits = visual_embeds.float() @ text_embeds.float().T  # [N, T]
    relevance = torch.softmax(logits, dim=-1).mean(dim=0)  # [T]
    raters = relevance >= relevance.mean()
    raters[torch.argmax(relevance)] = True
    return raters


def dpc_knn(features: torch.Tensor, num_clusters: int, knn: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN, as in TCFormer).

    ``features`` [n, D]. Density ρᵢ = exp(−mean squared distance to the ``knn`` nearest neighbours);
    δᵢ = distance to the nearest point of higher density (the densest point: its largest distance);
    centres = the ``num_clusters`` points with the largest ρ·δ; every point joins its nearest centre.
    Returns (centre indices [c] ascending, assignment [n] in 0..c-1).
    """
    n = features.shape[0]
    num_clusters = max(1, min(num_clusters, n))
    x = features.float()
    distance = torch.cdist(x, x) / max(x.shape[1] ** 0.5, 1.0)  # [n, n]
    neighbours = min(knn, n - 1)
    if neighbours > 0:
        nearest = torch.topk(distance, neighbours + 1, dim=-1, largest=False).values[:, 1:]  # skip self
        density = torch.exp(-(nearest**2).mean(dim=-1))
    else:
        density = torch.ones(n, device=x.device)
    # tiny deterministic tie-break so that equal densities still order strictly
    density = density + torch.arange(n, device=x.device) * 1e-9
    higher = density[None, :] > density[:, None]  # [n, n]: j denser than i
    far = distance.max()
    delta = torch.where(higher, distance, far).min(dim=-1).values
    delta[density.argmax()] = far
    centres = torch.sort(torch.topk(density * delta, num_clusters).indices).values
    assignment = distance[:, centres].argmin(dim=-1)
    assignment[centres] = torch.arange(centres.numel(), device=x.device)
    return centres, assignment


def cluster_means(features: torch.Tensor, assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """[c, D] mean of the features assigned to each cluster."""
    sums = features.new_zeros(num_clusters, features.shape[1]).index_add_(0, assignment, features)
    counts = torch.bincount(assignment, minlength=num_clusters).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]
