"""VisionZip core: dominant tokens by attention score + contextual tokens by key-similarity merging.

VisionZip (Yang et al., arXiv 2412.04467, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models"; official code dvlab-research/VisionZip @ 3151f6d, ``visionzip/clip_encoder.py`` L43-83).
Default split for a 64-token budget is 54 dominant + 10 contextual, and the same ratio for 128 (108 + 20)
and 192 (162 + 30). In the official LLaVA code the dominant count includes the [CLS] token (it keeps CLS +
``dominant - 1`` patches); this module works on the patch tokens only, so the caller
(:class:`vtprune.catalog.pre_llm.VisionZip`) passes ``dominant - 1`` and adds the CLS state itself.
Identical to the official routine on identical float32 inputs (tests/test_fidelity_pre_llm.py); the official
normalises keys by their norm without an epsilon (a zero key gives NaN there, cosine 0 here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cls_attention import topk_select

__all__ = ["VisionZipResult", "visionzip_select", "split_visionzip_budget", "DROPPED"]

#: ``assignment`` value of a token that is neither kept nor merged (only when ``contextual == 0``).
DROPPED = -2


@dataclass(frozen=True)
class VisionZipResult:
    """Result of :func:`visionzip_select`.

    keep: ``[dominant]`` long, ascending indices of the dominant tokens.
    merged: ``[C, Dv]`` contextual tokens (dtype of ``hidden``), in the order of ``anchors``.
    anchors: ``[C]`` long, ascending index (0..N-1) of the target token of each contextual token.
    assignment: ``[N]`` long; -1 for dominant tokens, else the contextual output index (0..C-1) the
        token was merged into (targets map to their own index); :data:`DROPPED` (-2) for tokens that
        were discarded because ``contextual == 0``.
    """

    keep: torch.Tensor
    merged: torch.Tensor
    anchors: torch.Tensor
    assignment: torch.Tensor


def split_visionzip_budget(budget: int, dominant_ratio: float = 54 / 64) -> tuple[int, int]:
    """Split a VisionZip token budget into ``(dominant, contextual)``.

    ``dominant = floor(budget * dominant_ratio + 0.5)`` (round half up), default ratio 54/64 from
    VisionZip (2412.04467): 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30). When ``budget >= 2``
    at least one contextual token is kept.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if not (isinstance(dominant_ratio, (int, float)) and 0.0 <= dominant_ratio <= 1.0):
        raise ValueError(f"dominant_ratio must be in [0, 1], got {dominant_ratio!r}")
    dominant = min(budget, math.floor(budget * dominant_ratio + 0.5))
    if budget >= 2 and dominant == budget:
        dominant -= 1
    return dominant, budget - dominant


def visionzip_select(
    hidden: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, dominant: int, contextual: int
) -> VisionZipResult:
    """VisionZip (arXiv 2412.04467) token selection for one image; defaults 54 + 10 for 64 tokens.

    ``hidden [N, Dv]`` encoder outputs, ``keys [N, Dk]`` (the attention keys used for similarity),
    ``scores [N]`` (e.g. [CLS] attention; the caller removes the CLS token beforehand if it must not
    be merged). Steps:

    1. dominant = top-``dominant`` tokens by ``scores`` (ties -> lower index).
    2. The R remaining tokens, in original order, provide ``contextual`` targets at positions
       ``0, step, 2*step, ...`` with ``step = max(1, R // contextual)``.
    3. Every other remaining token is assigned to the target with the most cosine-similar key
       (float32, ties -> earlier target).
    4. contextual token = target hidden + mean hidden of the tokens assigned to it (a target with
       nothing assigned stays its own hidden state).

    If ``dominant + contextual >= N`` every token is kept and nothing is merged.
    """
    if hidden.ndim != 2 or keys.ndim != 2 or scores.ndim != 1:
        raise ValueError(
            "expected hidden [N, Dv], keys [N, Dk], scores [N]; got "
            f"{tuple(hidden.shape)}, {tuple(keys.shape)}, {tuple(scores.shape)}"
        )
    n = hidden.shape[0]
    if keys.shape[0] != n or scores.shape[0] != n:
        raise ValueError(
            f"hidden, keys and scores must have the same N, got {hidden.shape[0]}, {keys.shape[0]}, {scores.shape[0]}"
        )
    for name, value in (("dominant", dominant), ("contextual", contextual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    device = hidden.device
    keys = keys.to(device)
    scores = scores.to(device)
    empty_long = torch.empty(0, dtype=torch.long, device=device)

    if dominant + contextual >= n:
        return VisionZipResult(
            keep=torch.arange(n, dtype=torch.long, device=device),
            merged=hidden.new_empty((0, hidden.shape[1])),
            anchors=empty_long,
            assignment=torch.full((n,), -1, dtype=torch.long, device=device),
        )

    keep = topk_select(scores, dominant)  # [dominant], ascending
    is_dominant = torch.zeros(n, dtype=torch.bool, device=device)
    is_dominant[keep] = True
    remaining = torch.nonzero(~is_dominant).squeeze(1)  # [R], original order, R > contextual
    assignment = torch.full((n,), DROPPED, dtype=torch.long, device=device)
    assignment[keep] = -1

    if contextual == 0:
        return VisionZipResult(
            keep=keep,
            merged=hidden.new_empty((0, hidden.shape[1])),
            anchors=empty_long,
            assignment=assignment,
        )

    num_rem = remaining.numel()
    step = max(1, num_rem // contextual)
    target_pos = torch.arange(0, num_rem, step, device=device)[:contextual]  # [C] positions in remaining
    is_target = torch.zeros(num_rem, dtype=torch.bool, device=device)
    is_target[target_pos] = True
    anchors = remaining[target_pos]  # [C], ascending
    others = remaining[~is_target]  # [R - C]

    unit = F.normalize(keys.float(), dim=-1)  # [N, Dk]
    sim = unit[others] @ unit[anchors].T  # [R - C, C] cosine similarity
    nearest = torch.argmax(sim, dim=1)  # [R - C], first max -> earliest target on ties

    num_ctx = anchors.numel()
    hid = hidden.float()
    sums = torch.zeros(num_ctx, hidden.shape[1], dtype=torch.float32, device=device)
    sums.index_add_(0, nearest, hid[others])  # [C, Dv]
    counts = torch.bincount(nearest, minlength=num_ctx).to(torch.float32).clamp_min(1.0)  # [C]
    merged = (hid[anchors] + sums / counts[:, None]).to(hidden.dtype)  # [C, Dv]

    assignment[anchors] = torch.arange(num_ctx, dtype=torch.long, device=device)
    assignment[others] = nearest
    return VisionZipResult(keep=keep, merged=merged, anchors=anchors, assignment=assignment)
