"""CDPruner core: conditional DPP over the visual tokens, fast greedy MAP inference.

CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"; official code Theia-4869/CDPruner @ 9541616,
``llava/model/llava_arch.py`` L140-187). Greedy MAP after Chen et al. 2018 (incremental Cholesky).
"""

from __future__ import annotations

import torch

__all__ = ["cdpruner_relevance", "cdpruner_kernel", "dpp_greedy_map", "cdpruner_select"]


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, theta: float | None = None
                       ) -> torch.Tensor:
    """[N] relevance of each visual token to the instruction, as the official code: ``mean_m(-cos(img_i,
    text_m))`` (the official code negates the cosine), min-max normalised ``(r - min + 1e-6) / (max - min)``;
    with ``theta`` (commented out in the official code) then ``exp(theta / (2 (1 - theta)) * r)``.
    ``image_embeds [N, C]``, ``text_embeds [M, C]``, float32."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected image_embeds [N, C] and text_embeds [M, C], got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    if text_embeds.shape[0] == 0:
        raise ValueError("text_embeds holds no instruction token")
    img = image_embeds.detach().float()
    txt = text_embeds.detach().float().to(img.device)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    relevance = (-(img @ txt.T)).mean(dim=-1)  # [N]
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def cdpruner_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``L = diag(rel) S diag(rel)`` with ``S`` the cosine similarity of ``features [N, D]``; [N, N] float32."""
    unit = features.detach().float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T  # [N, N]
    return relevance[:, None] * similarity * relevance[None, :]


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel ``[N, N]`` (fast incremental Cholesky, Chen et al. 2018): ``k`` indices
    in the order picked. ``d_i^2 = L_ii``; each step picks ``j = argmax d^2`` (first on ties), ``e = (L_j -
    sum_t c_t[j] c_t) / sqrt(d_j^2)``, ``d^2 -= e^2``, ``d_j^2 = -inf``."""
    n = kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != n:
        raise ValueError(f"kernel must be square [N, N], got {tuple(kernel.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    kernel = kernel.float()
    cis = torch.zeros(k, n, dtype=torch.float32, device=kernel.device)  # [k, N]
    di2s = torch.diagonal(kernel).clone()  # [N]
    picked = torch.empty(k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = torch.argmax(di2s)
        picked[i] = j
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])  # [N]
        cis[i] = eis
        di2s -= eis.square()
        di2s[j] = float("-inf")
    return picked


def cdpruner_select(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """CDPruner for one image / crop: the DPP greedy MAP on ``diag(rel) S diag(rel)``; kept indices ascending."""
    if features.ndim != 2 or relevance.shape != (features.shape[0],):
        raise ValueError(f"expected features [N, D] and relevance [N], got {tuple(features.shape)} and "
                         f"{tuple(relevance.shape)}")
    picked = dpp_greedy_map(cdpruner_kernel(features, relevance.float()), k)
    return torch.sort(picked).values


