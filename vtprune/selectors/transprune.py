"""TransPrune — token transition + instruction-guided attention (Li et al., CVPR 2026, arXiv 2507.20630).
Pure tensor code; the registry glue is vtprune/catalog/in_llm.py (class ``TransPrune``).

Official code: liaolea/TransPrune @ c9e8284, ``llava/model/modeling_llama_transprune.py``:
``compute_transf_weight`` L914-927 (one sublayer's transition weight), L1446-1514 (IGA + TTV scoring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the official normaliser's guard (``x / (x.sum() + 1e-8)``)
EPS = 1e-8


def transition_weight(before: torch.Tensor, after: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """Token transition of one sublayer (attention or MLP): ``[B, L]`` float32.

    ``before`` [B, L, D] is the sublayer's input (after its pre-norm), ``after`` [B, L, D] its output. For each
    token: ``(‖after‖ / ‖before‖) · softmax_L(1 − cos(before, after))`` — the norm ratio times the direction
    change, the latter turned into a distribution over the sequence. ``real`` [B, L] bool (False on padding)
    restricts the softmax to each sample's real tokens (padding gets 0); None: every token is real.
    """
    before, after = before.float(), after.float()
    ratio = after.norm(dim=-1) / before.norm(dim=-1)  # [B, L]
    change = 1.0 - F.cosine_similarity(before, after, dim=-1)  # [B, L]
    if real is None:
        real = torch.ones_like(change, dtype=torch.bool)
    real = real.to(change.device)
    spread = torch.softmax(change.masked_fill(~real, float("-inf")), dim=-1).nan_to_num(0.0)  # [B, L]
    return torch.where(real, ratio * spread, torch.zeros_like(ratio))


def transprune_scores(transition: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Score of each visual token: ``TTV/ΣTTV + IGA/ΣIGA`` (both normalised over the candidates). ``transition``
    [N] is the accumulated transition weight, ``attention`` [N] the instruction-guided attention."""
    transition, attention = transition.float(), attention.float()
    return transition / (transition.sum() + EPS) + attention / (attention.sum() + EPS)


def transprune_select(transition: torch.Tensor, attention: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` candidates with the highest :func:`transprune_scores`; [N] inputs."""
    scores = transprune_scores(transition, attention)
    keep = max(0, min(int(keep), scores.numel()))
    return torch.sort(scores.topk(keep).indices).values
