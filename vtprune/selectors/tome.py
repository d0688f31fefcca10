"""ToMe core: bipartite soft matching and size-weighted merging of the tokens of one ViT block.

Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461); official code facebookresearch/ToMe @ af95e4b,
``tome/merge.py`` L18-97 (``bipartite_soft_matching``), L210-224 (``merge_wavg``), ``tome/utils.py`` L80-105
(``parse_r``). Pure functions of tensors; the engine (``vtprune/engine/vit_stage.py``) applies the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MergePlan", "apply_merge", "bipartite_soft_matching", "parse_r", "schedule_for_target"]


@dataclass
class MergePlan:
    """How the ``t`` tokens of a block become ``t - r`` (batched over rows, the same ``r`` in every row).

    ``keep``  LongTensor[B, t - r]: the current token each new token starts from, in the new order (official
              order: the unmerged even tokens, CLS first, then every odd token)
    ``src``   LongTensor[B, r]: current tokens merged away
    ``dst``   LongTensor[B, r]: index (into the new order) of the token each ``src`` token is merged into
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool) -> MergePlan | None:
    """ToMe's balanced bipartite matching: ``metric`` [B, t, c] (the block's keys averaged over heads).

    Tokens alternate into sets A (even index) and B (odd index); every A token's most cosine-similar B token is
    its match, and the ``r`` A tokens with the most similar matches are merged into them. ``r`` is capped at half
    the unprotected tokens; ``class_token`` protects token 0 (never merged). None when nothing is merged.
    """
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # [B, ta, tb]
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # [B, ta]
        edge_idx = node_max.argsort(dim=-1, descending=True)  # [B, ta]
        unm_idx = edge_idx[..., r:]
        src_idx = edge_idx[..., :r]
        dst_idx = node_idx.gather(dim=-1, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=-1)[0]
    num_b = t // 2
    rows = metric.shape[0]
    odd = (2 * torch.arange(num_b, device=metric.device) + 1).expand(rows, num_b)
    keep = torch.cat([2 * unm_idx, odd], dim=-1)
    return MergePlan(keep=keep, src=2 * src_idx, dst=unm_idx.shape[-1] + dst_idx)


def apply_merge(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average (``merge_wavg``): ``x`` [B, t, d], ``size`` [B, t, 1] (tokens each one stands for).
    Returns the merged tokens [B, t - r, d] and their sizes [B, t - r, 1]."""
    weighted = x * size

    def merge(values: torch.Tensor) -> torch.Tensor:  # [B, t, c] -> [B, t - r, c], summing src into dst
        c = values.shape[-1]
        out = values.gather(-2, plan.keep[..., None].expand(-1, -1, c))
        moved = values.gather(-2, plan.src[..., None].expand(-1, -1, c))
        return out.scatter_reduce(-2, plan.dst[..., None].expand(-1, -1, c), moved, reduce="sum")

    new_size = merge(size)
    return merge(weighted) / new_size, new_size


def parse_r(num_layers: int, r: int | tuple | list) -> list[int]:
    """Tokens merged per layer from ToMe's ``r``: an int (constant), ``(r, inflection)`` (linear schedule from
    ``r * (1 - inflection)`` to ``2r`` minus that; -1 = the paper's decreasing schedule) or an explicit list
    (padded with zeros). As ``tome/utils.py`` ``parse_r``."""
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(low + step * i) for i in range(num_layers)]


def schedule_for_target(num_tokens: int, target: int, num_layers: int, protected: int) -> list[int]:
    """A near-constant-``r`` schedule over ``num_layers`` merging layers taking ``num_tokens`` (protected
    included) to ``target`` tokens: each layer merges the even share of what is left (earlier layers take the
    remainder), capped at ToMe's half of the unprotected tokens, and more where the later layers' caps could
    not otherwise reach the target. Raises ValueError when no schedule reaches it."""
    if not 0 < target <= num_tokens:
        raise ValueError(f"target {target} must be in [1, {num_tokens}]")

    def reach(t: int, layers: int) -> int:  # fewest tokens ``layers`` maximal merges leave
        for _ in range(layers):
            t -= max(0, (t - protected) // 2)
        return t

    if reach(num_tokens, num_layers) > target:
        raise ValueError(f"{num_layers} layers merging at most half their tokens cannot bring {num_tokens} tokens "
                         f"down to {target}")
    schedule, t = [], num_tokens
    for layer in range(num_layers):
        left, later = t - target, num_layers - layer - 1
        cap = max(0, (t - protected) // 2)
        r = min(math.ceil(left / (later + 1)) if left > 0 else 0, cap)
        low, high = r, cap  # the smallest r >= the share from which the later layers still reach the target
        while low < high:
            mid = (low + high) // 2
            if reach(t - mid, later) <= target:
                high = mid
            else:
                low = mid + 1
        schedule.append(low)
        t -= low
    return schedule
