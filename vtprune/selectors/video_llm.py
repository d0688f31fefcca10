"""Pure cores of the in-LLM and decode-time stages of the video methods (tensors in, indices / tokens out).

* HoliTom's inner-LLM merge (cokeshao/HoliTom @ e9b2972 ``holitom/modeling_qwen2.py`` L121-208):
  :func:`holitom_inner_merge`;
* PruneVid's in-LLM selection (Visual-AI/PruneVid @ b12600c ``models/pllava/elastic_cache.py`` L108-146):
  :func:`grouped_topk`;
* FrameFusion (thu-nics/FrameFusion @ fbec1d2 ``framefusion/main.py`` L38-343): :func:`framefusion_similarity`,
  :func:`framefusion_merge`, :func:`framefusion_merge_flags`, :func:`framefusion_pruning_ratio`,
  :func:`framefusion_prune_count`, :func:`framefusion_weights`;
* DyCoke's decode-time selection (KD-TAO/DyCoke @ dd74634 ``llava/model/language_model/modeling_qwen2.py``
  L78-115): :func:`dycoke_decode_keep`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dycoke_decode_keep",
    "framefusion_merge",
    "framefusion_merge_flags",
    "framefusion_prune_count",
    "framefusion_pruning_ratio",
    "framefusion_similarity",
    "framefusion_weights",
    "grouped_topk",
    "holitom_inner_merge",
]

#: FrameFusion's patch type of a text token (never merged)
TEXT = -1


def holitom_inner_merge(hidden: torch.Tensor, scores: torch.Tensor, keep: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's inner-LLM merge of one sample's visual tokens ``hidden`` [V, D] with attention ``scores`` [V].

    The ``keep`` tokens with the highest scores stay (official: round(V · (1 − r)), r = 0.5); every other token
    is averaged into the kept token whose hidden state is most cosine-similar (similarities from the states
    before any merging; ties: the higher-scored kept token), one at a time in sequence order, kept ← (kept +
    dropped) / 2, as the official loop does -- a kept token that absorbs a₁ < … < a_m becomes
    2⁻ᵐ·h + Σ_r 2^-(m−r+1)·a_r.

    Returns (kept indices [keep] ascending, their new hidden states [keep, D], weights [keep, V] with
    new = weights @ hidden).
    """
    v, d = hidden.shape
    keep = max(0, min(int(keep), v))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    chosen = order[:keep]  # descending score, as the official topk
    weights = torch.zeros(keep, v, dtype=torch.float32, device=hidden.device)
    weights[torch.arange(keep, device=hidden.device), chosen] = 1.0
    if keep == 0 or keep == v:
        ordering = torch.argsort(chosen)
        return chosen[ordering], hidden[chosen[ordering]], weights[ordering]
    dropped = torch.sort(order[keep:]).values  # ascending sequence order
    x = hidden.float()
    sim = F.normalize(x[dropped], dim=-1) @ F.normalize(x[chosen], dim=-1).T  # [V-k, k]
    target = sim.argmax(dim=-1)  # first max -> higher-scored kept token
    counts = torch.bincount(target, minlength=keep)  # m per kept token
    # rank r (1-based) of each dropped token among those of its target, in sequence order
    rank = torch.zeros_like(target)
    seen = torch.zeros(keep, dtype=torch.long, device=hidden.device)
    for i, j in enumerate(target.tolist()):  # V-k python steps on small ints only
        seen[j] += 1
        rank[i] = seen[j]
    weights[torch.arange(keep, device=hidden.device)] *= torch.pow(0.5, counts.float())[:, None]
    weights[target, dropped] = torch.pow(0.5, (counts[target] - rank + 1).float())
    new = weights @ x  # [k, D]
    ordering = torch.argsort(chosen)
    return chosen[ordering], new[ordering].to(hidden.dtype), weights[ordering]


def grouped_topk(scores: torch.Tensor, groups: list[torch.Tensor], alpha: float = 0.4) -> torch.Tensor:
    """PruneVid's in-LLM selection: in every group (a segment's static tokens, or one frame's dynamic tokens;
    ``groups`` = index tensors into ``scores`` [V]) keep the int(len · ``alpha``) best-scored tokens. Returns the
    kept indices, ascending. (The official scores are the text→visual attention, max over heads and queries.)"""
    kept = []
    for group in groups:
        count = int(group.numel() * alpha)
        if count:
            best = torch.sort(scores[group].float(), descending=True, stable=True).indices[:count]
            kept.append(group[best])
    if not kept:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.sort(torch.cat(kept)).values


def framefusion_similarity(hidden: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """FrameFusion's ``compute_similarity_and_token_index_by_patch`` for one sample: ``hidden`` [L, D], ``patch``
    [L] (the token's position inside its frame, :data:`TEXT` for text). Returns [L]: the cosine similarity of
    each visual token with the previous token (in sequence order) of the same patch position, -2 where there is
    none (first frame, text)."""
    sim = torch.full((hidden.shape[0],), -2.0, dtype=torch.float32, device=hidden.device)
    visual = torch.nonzero(patch != TEXT).flatten()
    if visual.numel() < 2:
        return sim
    key = patch[visual] * (hidden.shape[0] + 1) + visual  # sort by (patch, sequence index)
    ordered = visual[torch.argsort(key)]
    x = hidden.float()
    pair = F.cosine_similarity(x[ordered[:-1]], x[ordered[1:]], dim=-1)
    same = patch[ordered[:-1]] == patch[ordered[1:]]
    sim[ordered[1:]] = torch.where(same, pair, torch.full_like(pair, -2.0))
    return sim


def framefusion_merge(hidden: torch.Tensor, patch: torch.Tensor, merge: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, list[int]]]]:
    """FrameFusion's ``merge_tokens_and_get_mask`` for one sample: the tokens flagged in ``merge`` [L] (bool; only
    tokens with a same-position predecessor may be flagged) are removed; every maximal run of flagged tokens in
    the (patch, time) order collapses into the unflagged token just before it, which becomes the mean of itself
    and the run. Returns (keep [L] bool, new hidden [L, D] (rows of removed tokens unchanged), [(kept token,
    [merged tokens])] for every token that absorbed a run)."""
    keep = ~merge
    out = hidden.clone()
    groups: list[tuple[int, list[int]]] = []
    visual = torch.nonzero(patch != TEXT).flatten()
    if not bool(merge.any()):
        return keep, out, groups
    key = patch[visual] * (hidden.shape[0] + 1) + visual
    ordered = visual[torch.argsort(key)].tolist()
    flags = merge[ordered].tolist()
    i = 0
    while i < len(ordered):
        if flags[i] and i > 0:
            head, run = ordered[i - 1], []
            while i < len(ordered) and flags[i]:
                run.append(ordered[i])
                i += 1
            members = torch.tensor([head, *run], device=hidden.device)
            out[head] = hidden[members].float().mean(dim=0).to(hidden.dtype)
            groups.append((head, run))
        else:
            i += 1
    return keep, out, groups


def framefusion_pruning_ratio(sparsities: list[float], cost: float, num_layers: int) -> float:
    """FrameFusion's ``_compute_pruning_ratio``: the fraction of the remaining visual tokens the next layer must
    drop so that the average per-layer token share over ``num_layers`` layers equals ``cost``, after the layers
    whose merge fractions are ``sparsities``. 0 when no drop is needed; an error when ``cost`` is already
    exceeded."""
    s, spent = 1.0, 0.0
    for value in sparsities:
        s *= 1 - value
        spent += s
    remaining = num_layers * cost - spent
    if remaining < 0:
        raise ValueError(f"framefusion: cost={cost} is below what the first {len(sparsities)} layers already spend")
    share = remaining / ((num_layers - len(sparsities)) * s)
    return 0.0 if share > 1 else 1 - share


def framefusion_merge_flags(similarity: torch.Tensor, sparsities: list[float], cost: float, num_layers: int,
                            similarity_lower_bound: float = 0.6, ratio_lower_bound: float = 0.1
                            ) -> tuple[torch.Tensor, list[float], bool, bool]:
    """One merging step of FrameFusion (``FrameFusion.forward`` L103-128) on one sample's V visual tokens.

    ``similarity`` [V]: :func:`framefusion_similarity` of the visual tokens (-2 where a token has no same-place
    predecessor); ``sparsities``: the merge fractions of the earlier steps. With s* the sparsity the remaining
    layers need (:func:`framefusion_pruning_ratio`) and f the fraction of tokens at or above
    ``similarity_lower_bound``: f < s* merges them all and records f (merging ends when f < ``ratio_lower_bound``,
    pruning comes next); otherwise the int(s*·V) most similar tokens merge and both merging and pruning end.

    Returns (flags [V] bool: the tokens merged into their predecessor, the new sparsities, merging finished,
    pruning finished).
    """
    count = similarity.numel()
    bound = framefusion_pruning_ratio(sparsities, cost, num_layers)
    flags = similarity >= similarity_lower_bound
    ratio = int(flags.sum()) / count if count else 0.0
    if ratio < bound:
        return flags, [*sparsities, ratio], ratio < ratio_lower_bound, False
    chosen = torch.sort(similarity.float(), descending=True, stable=True).indices[:int(bound * count)]
    flags = torch.zeros_like(flags)
    flags[chosen] = True
    return flags, list(sparsities), True, True


def framefusion_prune_count(count: int, sparsities: list[float], cost: float, num_layers: int) -> int:
    """FrameFusion's pruning step (``FrameFusion.forward`` L61-79): of the ``count`` visual tokens left after
    merging, round(count · (1 − p)) stay, p = :func:`framefusion_pruning_ratio` of the recorded sparsities."""
    return round(count * (1 - framefusion_pruning_ratio(sparsities, cost, num_layers)))


def framefusion_weights(groups: list[tuple[int, list[int]]], count: int, device=None) -> torch.Tensor:
    """[m, count] merge weights of :func:`framefusion_merge`'s groups: each merged token is the plain mean of its
    head and its run (the official divides by run length + 1)."""
    weights = torch.zeros(len(groups), count, dtype=torch.float32, device=device)
    for i, (head, run) in enumerate(groups):
        weights[i, [head, *run]] = 1.0 / (len(run) + 1)
    return weights


def dycoke_decode_keep(attention: torch.Tensor, valid: torch.Tensor, keep_ratio: float) -> list[torch.Tensor]:
    """DyCoke's decode-time choice: per row of ``attention`` [B, V] (the current token's head-mean attention over
    the visual cache entries; ``valid`` [B, V] marks real entries), the int(n · ``keep_ratio``) entries with the
    highest attention (n = the row's real entries), ascending. (``update_cache``: top int(len · (1 − P)).)"""
    out = []
    for b in range(attention.shape[0]):
        real = torch.nonzero(valid[b]).flatten()
        count = int(real.numel() * keep_ratio)
        best = torch.sort(attention[b, real].float(), descending=True, stable=True).indices[:count]
        out.append(torch.sort(real[best]).values)
    return out
