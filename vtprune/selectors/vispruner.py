"""VisPruner core: important tokens by attention + diverse tokens by iterative similarity removal.

VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818 v2 "Beyond Text-Visual Attention: Exploiting Visual Cues
for Effective Token Pruning in VLMs"; official code Theia-4869/VisPruner @ aefa01a,
``llava/model/llava_arch.py`` L140-186 ``encode_images``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["vispruner_select", "split_vispruner_budget"]

#: tokens removed per dedup round in the official code (``r = min(8, R - T_div)``)
STEP = 8


def split_vispruner_budget(k: int, important_ratio: float) -> tuple[int, int]:
    """``(important, diverse)`` for ``k`` kept tokens: ``important = int(k * important_ratio)`` (the official
    ``int(T * r)``, truncation), ``diverse = k - important``."""
    important = int(k * important_ratio)
    return important, k - important


def vispruner_select(scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int,
                     step: int = STEP) -> torch.Tensor:
    """Kept indices (ascending) of VisPruner for one image / crop.

    ``scores [N]`` attention (CLS row, or mean received attention), ``features [N, C]`` the vision features
    compared for similarity (the projector's input). ``important`` tokens: the top by ``scores`` (descending
    order, ties to the lower index). The other tokens, in descending score order, form the residual list; while
    it holds more than ``diverse`` tokens: ``r = min(step, R - diverse)``; split the list alternately (even
    ranks A, odd ranks B); each A token's highest cosine similarity to any B token; drop the ``r`` A tokens with
    the highest; the list becomes [surviving A in descending-similarity order, B]. The survivors are the diverse
    tokens. Cosines in float32. Where the official indexing fails — an odd R, or fewer than ``r`` A tokens
    (small residuals) — the same rule goes on: A holds ``ceil(R / 2)`` tokens, and at most all of A is dropped.
    """
    if scores.ndim != 1 or features.ndim != 2 or features.shape[0] != scores.shape[0]:
        raise ValueError(f"expected scores [N] and features [N, C], got {tuple(scores.shape)} and "
                         f"{tuple(features.shape)}")
    n = scores.shape[0]
    for name, value in (("important", important), ("diverse", diverse), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if step < 1:
        raise ValueError("step must be >= 1")
    if important + diverse >= n:
        return torch.arange(n, device=scores.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # [N]
    kept, residual = order[:important], order[important:]
    if diverse > 0 and residual.numel() > diverse:
        unit = F.normalize(features.detach().float()[residual], dim=-1)  # [R0, C]
        similarity = unit @ unit.T  # [R0, R0], once: each round reads its A x B block
        local = torch.arange(residual.numel(), device=residual.device)  # rows of `similarity`
        while True:
            r = min(step, local.numel() - diverse)
            if r <= 0:
                break
            a, b = local[0::2], local[1::2]
            best = similarity[a][:, b].max(dim=-1).values  # [|A|] highest similarity to B
            survivors = torch.sort(best, descending=True, stable=True).indices[r:]
            local = torch.cat([a[survivors], b])
        residual = residual[local]
    chosen = torch.cat([kept, residual]) if diverse > 0 else kept
    return torch.sort(chosen).values
