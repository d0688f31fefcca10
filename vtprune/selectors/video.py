"""Pure cores of the video token-reduction methods that work on a whole clip before the LLM.

Every function takes a clip as ``features`` [T, N, D] (T frames / temporal groups in time order, N = h·w tokens
per frame in raster order, D = LLM-embedding width) plus per-token signals [T, N] and returns a
:class:`ClipResult` whose indices are flat into T·N (frame-major: ``t * N + n``). No model classes here.

* HoliTom (Shao et al., NeurIPS 2025, arXiv 2505.21334; cokeshao/HoliTom @ e9b2972 ``holitom/llava_arch.py``)
  -- :func:`holitom_windows`, :func:`holitom_select`;
* FastVID (Shen et al., NeurIPS 2025, arXiv 2503.11187; LunarShen/FastVID @ a40a109
  ``fastvid_llavaonevision/.../language_model/modeling_qwen2.py`` L900-1075) -- :func:`fastvid_segments`,
  :func:`fastvid_select`;
* DyCoke stage 1 (Tao et al., CVPR 2025, arXiv 2411.15024; KD-TAO/DyCoke @ dd74634 ``llava/model/llava_arch.py``
  L35-91) -- :func:`dycoke_ttm`;
* PruneVid stage 1 (Huang et al., ACL 2025, arXiv 2412.16117; Visual-AI/PruneVid @ b12600c
  ``models/pllava/modeling_pllava.py`` L111-300, L759-827) -- :func:`prunevid_segments`, :func:`prunevid_merge`;
* VisionZip for video (the per-frame port in cokeshao/HoliTom ``visionzip/llava_arch.py`` L61-183) --
  :func:`visionzip_video_select`.

Determinism: the official DPC-KNN adds uniform noise of 1e-6 to the densities to break ties; here exactly equal
densities are ordered by index (the lower index counts as denser) and exactly equal similarities / scores go to the
lower index, so the same inputs always give the same tokens. On inputs without near-ties the choice is the
official one (tests/test_video_selectors.py compares with transcriptions of the official routines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .visionzip import visionzip_select

__all__ = [
    "ClipResult",
    "dpc_density_scores",
    "dycoke_ttm",
    "fastvid_segments",
    "fastvid_select",
    "frame_similarity",
    "holitom_select",
    "holitom_windows",
    "prunevid_merge",
    "prunevid_segments",
    "refine_segment_labels",
    "visionzip_video_select",
]


@dataclass
class ClipResult:
    """What a clip selector returns; all indices are flat into T·N (``t * N + n``).

    ``keep``     LongTensor[k], ascending: tokens kept as they are
    ``merged``   Tensor[m, D] or None: new tokens (in the features' space)
    ``anchors``  LongTensor[m]: the flat index whose position each merged token takes (never a kept index)
    ``weights``  Tensor[m, T·N] or None: merged token j = sum_i weights[j, i] * features_flat[i]
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keep.numel() + (0 if self.merged is None else self.merged.shape[0])


def _check_clip(features: torch.Tensor, **signals: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(features, torch.Tensor) or features.ndim != 3 or not features.is_floating_point():
        raise ValueError(f"features must be a floating-point [T, N, D] tensor, got {getattr(features, 'shape', None)}")
    t, n, d = features.shape
    for name, value in signals.items():
        if value is not None and tuple(value.shape[:2]) != (t, n):
            raise ValueError(f"{name} must be [T, N, ...] = [{t}, {n}, ...] like the features, got {tuple(value.shape)}")
    return t, n, d


class _Merges:
    """Collects merged tokens with their anchors and weights over the flat clip (T·N tokens), in blocks."""

    def __init__(self, total: int, width: int, like: torch.Tensor):
        self.total, self.width, self.like = total, width, like
        self.tokens: list[torch.Tensor] = []
        self.anchors: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def block(self, tokens: torch.Tensor, anchors: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
              values: torch.Tensor) -> None:
        """``tokens`` [c, D] standing at flat ``anchors`` [c]; their weights: ``values`` at (``rows``, ``columns``)
        (row = index into this block, column = flat clip index; repeated entries add up)."""
        device = self.like.device
        weights = torch.zeros(tokens.shape[0], self.total, dtype=torch.float32, device=device)
        weights.index_put_((rows.to(device), columns.to(device)), values.to(device, torch.float32), accumulate=True)
        self.tokens.append(tokens)
        self.anchors.append(anchors.to(device))
        self.weights.append(weights)

    @property
    def count(self) -> int:
        return sum(t.shape[0] for t in self.tokens)

    def result(self, keep: torch.Tensor) -> ClipResult:
        device = self.like.device
        keep = torch.sort(keep.to(device)).values
        if not self.count:
            return ClipResult(keep=keep)
        return ClipResult(keep=keep, merged=torch.cat(self.tokens).to(self.like.dtype), anchors=torch.cat(self.anchors),
                          weights=torch.cat(self.weights))


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """[T-1, N] cosine similarity of every token with the token at the same position in the next frame."""
    x = F.normalize(features.float(), dim=-1)
    return (x[:-1] * x[1:]).sum(dim=-1)


def dpc_density_scores(x: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN (TCFormer) as HoliTom / FastVID / PruneVid compute it, for ``x`` [n, D].

    distance = Euclidean / √D (``torch.cdist``, as the official code); density ρᵢ = exp(−mean of the squared
    distances to the ``knn`` nearest points, itself included); δᵢ = distance to the nearest denser point (the
    densest: the largest distance of all). Returns (distance [n, n], score ρ·δ [n]). Equal densities: the lower
    index counts as denser (the official code adds 1e-6 uniform noise instead).
    """
    n, d = x.shape
    xf = x.float()
    distance = torch.cdist(xf, xf) / (d ** 0.5)  # [n, n]
    knn = max(1, min(knn, n))
    nearest = torch.topk(distance, knn, dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [n]
    index = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))  # [i, j]: j denser than i
    delta = torch.where(denser, distance, distance.max()).min(dim=-1).values
    return distance, delta * density


def _top_scores(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores in descending score order (ties: lower index first)."""
    return torch.sort(score, descending=True, stable=True).indices[:k]


# ------------------------------------------------------------------------------------------------------- HoliTom

def holitom_windows(similarity: torch.Tensor, tau: float = 0.8, max_window: int = 1024
                    ) -> tuple[list[tuple[int, int]], float]:
    """HoliTom's global temporal segmentation (``select_static_windows``, llava_arch.py L53-98).

    ``similarity`` [T-1, N]: same-position cosine between consecutive frames. A window [s, e] saves
    ``(#positions above tau in every pair of the window) · (e − s)`` tokens; a dynamic programme over the frames
    picks the windows (length 2..``max_window``, or single frames) that save the most. Ties keep the shorter
    window, as the official strict comparison does. Returns (windows [(start, end)] in time order, tokens saved).
    """
    frames = similarity.shape[0] + 1
    above = (similarity > tau).to(torch.int64)  # [T-1, N]
    saved = [[0] * frames for _ in range(frames)]  # saved[s][e]
    for s in range(frames - 1):
        runs = torch.cumprod(above[s:], dim=0).sum(dim=-1).tolist()  # [T-1-s]: static count of [s, s+1+i]
        for i, count in enumerate(runs):
            saved[s][s + 1 + i] = count * (i + 1)
    best = [0] * frames
    start = [0] * frames
    for i in range(frames):
        value, begin = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if candidate > value:
                value, begin = candidate, j + 1
        best[i], start[i] = value, begin
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], float(best[-1])


def _holitom_cluster(feat: torch.Tensor, count: int, knn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HoliTom's density clustering of ``feat`` [n, D] into ``count`` tokens (``merge_tokens_by_density`` /
    ``merge_tokens_by_clustering``): centres = top ρ·δ (ascending index, as the official sorts them), every other
    token joins its nearest centre (Euclidean; ties: the lower centre). Returns (centres [c], others [o], the
    centre each other token joins [o] (0..c-1))."""
    distance, score = dpc_density_scores(feat, min(knn, count))
    centres = torch.sort(_top_scores(score, count)).values
    is_centre = torch.zeros(feat.shape[0], dtype=torch.bool, device=feat.device)
    is_centre[centres] = True
    others = torch.nonzero(~is_centre).flatten()
    nearest = distance[others][:, centres].argmin(dim=-1) if others.numel() else others
    return centres, others, nearest


def _holitom_merge(merges: _Merges, feat: torch.Tensor, count: int, knn: int, beta: float, positions: torch.Tensor,
                   frames: torch.Tensor, n: int, anchor_frame: int) -> None:
    """Cluster ``feat`` [m, D] (the mean over ``frames`` of the tokens at ``positions`` [m]) into ``count`` tokens,
    centre ← β·centre + (1 − β)·mean(members) (a centre without members stays as it is), standing at
    ``anchor_frame``; weights over the flat clip (each feature row averages its ``frames``)."""
    centres, others, nearest = _holitom_cluster(feat, count, knn)
    c, size = centres.numel(), frames.numel()
    members = torch.bincount(nearest, minlength=c).to(feat.dtype)  # [c]
    sums = torch.zeros(c, feat.shape[1], dtype=feat.dtype, device=feat.device).index_add_(0, nearest, feat[others])
    has = members > 0
    tokens = torch.where(has[:, None], beta * feat[centres] + (1 - beta) * sums / members.clamp(min=1)[:, None],
                         feat[centres])
    centre_w = torch.where(has, torch.full_like(members, beta), torch.ones_like(members)) / size  # [c]
    member_w = (1 - beta) / (size * members.clamp(min=1))[nearest]  # [o]
    rows = torch.cat([torch.arange(c, device=feat.device).repeat_interleave(size), nearest.repeat_interleave(size)])
    cols = torch.cat([(frames[None, :] * n + positions[centres][:, None]).flatten(),
                      (frames[None, :] * n + positions[others][:, None]).flatten()])
    values = torch.cat([centre_w.repeat_interleave(size), member_w.repeat_interleave(size)])
    merges.block(tokens, anchor_frame * n + positions[centres], rows, cols, values)


def holitom_select(features: torch.Tensor, attention: torch.Tensor, retain_ratio: float = 0.1, tau: float = 0.8,
                   beta: float = 0.6, dominant_share: float = 0.0, knn: int = 7, max_window: int = 1024,
                   max_tokens: int | None = None) -> ClipResult:
    """HoliTom outer-LLM merging of one clip (llava_arch.py L199-311, L347-407).

    ``features`` [T, N, D] (pooled, projected frames), ``attention`` [T, N] (the vision encoder's mean received
    attention, pooled like the features). Steps, as the official code:

    1. windows = :func:`holitom_windows` on the same-position cosine of consecutive frames (threshold ``tau``);
       the ratio becomes ρ' = min(ρ / ((T·N − saved) / (T·N)), 1);
    2. per window [s, e] with e > s: positions above ``tau`` in every pair are static: averaged over the window
       into one token each, then clustered (DPC-KNN, ``knn`` neighbours) into round(n_static · ρ') tokens, each
       centre = β·centre + (1 − β)·mean(members) (β = ``beta``); they stand at the window's first frame;
    3. the other (dynamic) tokens of every frame: ceil(n_dyn · ρ') of them, of which
       round(· (1 − ``dominant_share``)) are the top by ``attention`` (kept as they are) and the rest DPC-KNN
       cluster tokens of the remaining ones (official default share 0: attention top-k only).

    With a single cluster the official k = min(7, 1) = 1 makes every density exp(0), so its random tie-break
    noise picks the centre; here the first position wins (deterministic).

    ``max_tokens``: the clip's token budget. The official ceil per frame can exceed ρ·T·N by up to a token per
    frame; vtprune then drops the excess kept dynamic tokens with the lowest attention (none at ``None``).
    """
    frames, n, d = _check_clip(features, attention=attention)
    total = frames * n
    merges = _Merges(total, d, features)
    similarity = frame_similarity(features)  # [T-1, N]
    windows, saved = holitom_windows(similarity, tau, max_window)
    ratio = min(retain_ratio / ((total - saved) / total), 1.0)
    positions = torch.arange(n, device=features.device)
    x = features.float()
    keep: list[torch.Tensor] = []
    for s, e in windows:
        size = e - s + 1
        if size == 1:
            static = torch.zeros(n, dtype=torch.bool, device=features.device)
        else:
            static = (similarity[s:e] > tau).all(dim=0)  # [N]
        static_pos, dynamic_pos = positions[static], positions[~static]
        window = torch.arange(s, e + 1, device=features.device)
        if static_pos.numel():
            count = round(static_pos.numel() * ratio)
            if count > 0:
                mean = x[s:e + 1, static_pos].mean(dim=0)  # [n_static, D]
                _holitom_merge(merges, mean, count, knn, beta, static_pos, window, n, s)
        n_dyn = dynamic_pos.numel()
        if not n_dyn:
            continue
        count = math.ceil(n_dyn * ratio)
        dominant = round(count * (1 - dominant_share))
        contextual = count - dominant
        scores = attention[s:e + 1][:, dynamic_pos].float()  # [W, n_dyn]
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # ties: lower index
        for w, t in enumerate(range(s, e + 1)):
            keep.append(t * n + dynamic_pos[order[w, :dominant]])
            if contextual > 0:
                rest_pos = torch.sort(dynamic_pos[order[w, dominant:]]).values
                _holitom_merge(merges, x[t, rest_pos], contextual, knn, beta, rest_pos, window[w:w + 1], n, t)
    kept = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long, device=features.device)
    if max_tokens is not None and kept.numel() + merges.count > max_tokens:
        excess = kept.numel() + merges.count - max_tokens
        if excess > kept.numel():
            raise ValueError(f"holitom: {merges.count} merged tokens alone exceed max_tokens={max_tokens}")
        order = torch.sort(attention.flatten()[kept].float(), stable=True).indices  # ascending attention
        drop = torch.zeros(kept.numel(), dtype=torch.bool, device=kept.device)
        drop[order[:excess]] = True
        kept = kept[~drop]
    return merges.result(kept)


# ------------------------------------------------------------------------------------------------------- FastVID

def fastvid_segments(global_features: torch.Tensor, cuts: int = 8, tau: float = 0.9) -> list[int]:
    """FastVID's DySeg (modeling_qwen2.py L928-937): frame lengths of the temporal segments.

    ``global_features`` [T, D]: one vector per frame. s_t = cos(g_t, g_{t+1}); the clip is cut after frame t when
    s_t is among the ``cuts − 1`` lowest similarities or below ``tau``. Equal similarities: the earlier pair is
    cut first (stable sort; the official ``topk`` leaves that order unspecified).
    """
    frames = global_features.shape[0]
    if frames == 1:
        return [1]
    g = global_features.float()
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)  # [T-1]
    lowest = torch.sort(sim, stable=True).indices[:max(0, min(cuts - 1, frames - 1))]
    below = torch.nonzero(sim < tau).flatten()
    cut = torch.unique(torch.cat([lowest, below])).tolist()
    bounds = [-1, *cut]
    if bounds[-1] != frames - 1:
        bounds.append(frames - 1)
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _batched_dpc_scores(x: torch.Tensor, knn: int) -> torch.Tensor:
    """:func:`dpc_density_scores` for every row of ``x`` [F, n, D] at once: the ρ·δ scores [F, n]."""
    f, n, d = x.shape
    distance = torch.cdist(x, x) / (d ** 0.5)  # [F, n, n]
    nearest = torch.topk(distance, max(1, min(knn, n)), dim=-1, largest=False).values
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [F, n]
    index = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None]))
    far = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, distance, far).min(dim=-1).values
    return delta * density


def fastvid_select(features: torch.Tensor, saliency: torch.Tensor, global_features: torch.Tensor,
                   frame_keep: int, context_share: float = 0.4, anchor_period: int = 4, beta: float = 0.6,
                   cuts: int = 8, tau: float = 0.9, knn: int = 4) -> ClipResult:
    """FastVID (DySeg + STPrune with density token merging), modeling_qwen2.py L900-1075.

    ``features`` [T, N, D] (projected frames), ``saliency`` [T, N] ([CLS]-like attention), ``global_features``
    [T, D] (a vector per frame, for DySeg), ``frame_keep`` = int(N · retention) tokens per frame. Per frame:
    ``frame_keep − int(frame_keep · context_share)`` salient tokens (top saliency, kept as they are), the rest of
    the frame's share is context. Per segment of L frames, anchor frames are every ``anchor_period``-th frame
    counted from the segment's end, each with (context · L) // ceil(L / p) context tokens: the top DPC-KNN
    (``knn`` = 4) scores among the anchor frame's non-salient tokens; every non-salient token of the segment (of
    the frame only, for a single-frame segment) joins its most cosine-similar context token of that anchor frame,
    which becomes w·token + (1 − w)·mean(joined), w = max(1 / (count + 1), ``beta``).
    """
    frames, n, d = _check_clip(features, saliency=saliency)
    if global_features.shape[0] != frames:
        raise ValueError(f"global_features must have one row per frame ({frames}), got {tuple(global_features.shape)}")
    device = features.device
    frame_keep = max(0, min(int(frame_keep), n))
    salient_n = frame_keep - int(frame_keep * context_share)
    context_n = frame_keep - salient_n
    sizes = fastvid_segments(global_features, cuts, tau)
    merges = _Merges(frames * n, d, features)
    order = torch.sort(saliency.float(), dim=1, descending=True, stable=True).indices  # [T, N], ties: lower index
    salient = order[:, :salient_n]  # [T, s]
    frame_base = torch.arange(frames, device=device)[:, None] * n
    keep = (frame_base + salient).flatten()
    if context_n == 0 or salient_n == n:
        return merges.result(keep)
    # candidates: the non-salient tokens of every frame, ascending: [T, M]; their DPC scores within the frame
    cand_pos = torch.sort(order[:, salient_n:], dim=1).values
    cand_flat = frame_base + cand_pos  # [T, M]
    x = features.reshape(frames * n, d).float()
    cand = x[cand_flat]  # [T, M, D]
    scores = _batched_dpc_scores(cand, knn)  # [T, M]
    unit = cand / cand.norm(dim=-1, keepdim=True)
    m = cand_pos.shape[1]
    offset = 0
    for length in sizes:
        anchors = max(1, (length + anchor_period - 1) // anchor_period)
        per_anchor = min((context_n * length) // anchors, m)
        single = (context_n * length) // anchors == context_n  # the official single-frame path (within the frame)
        for t in range(offset, offset + length):
            if (offset + length - 1 - t) % anchor_period:
                continue
            chosen = _top_scores(scores[t], per_anchor)  # [c], descending score
            lo, hi = (t, t + 1) if single else (offset, offset + length)
            pool, pool_unit = cand[lo:hi].reshape(-1, d), unit[lo:hi].reshape(-1, d)  # [P, D]
            pool_flat = cand_flat[lo:hi].reshape(-1)
            assignment = (pool_unit @ unit[t, chosen].T).argmax(dim=-1)  # [P], first max
            counts = torch.bincount(assignment, minlength=per_anchor).to(pool.dtype)  # [c]
            sums = torch.zeros(per_anchor, d, dtype=pool.dtype, device=device).index_add_(0, assignment, pool)
            w = (1 / (counts + 1)).clamp(min=beta)  # [c]
            tokens = w[:, None] * cand[t, chosen] + (1 - w[:, None]) * sums / counts.clamp(min=1)[:, None]
            centre_flat = cand_flat[t, chosen]
            rows = torch.cat([torch.arange(per_anchor, device=device), assignment])
            cols = torch.cat([centre_flat, pool_flat])
            values = torch.cat([w, ((1 - w) / counts.clamp(min=1))[assignment]])
            merges.block(tokens, centre_flat, rows, cols, values)
        offset += length
    return merges.result(keep)


# -------------------------------------------------------------------------------------------------------- DyCoke

def dycoke_ttm(features: torch.Tensor, merge_ratio: float = 0.7) -> torch.Tensor:
    """DyCoke's temporal token merging (``dycole_ttm``, llava_arch.py L35-91): flat kept indices, ascending.

    Frames in pairs (0,1), (2,3), ...: the second frame of each pair keeps its int((1 − K)·N) tokens least
    cosine-similar to the same position in the first (K = ``merge_ratio``); then, in groups of four frames
    starting at 0, 4, ... (``range(0, T − 4, 4)``, so the last group of four is left out, as in the official
    code), frame i+2 keeps its int((1 − K)·N) tokens least similar to frame i. Redundant tokens are dropped (the
    official code averages nothing despite the name). An unpaired last frame (odd T) stays whole (the official
    code drops it from the sequence).
    """
    frames, n, _ = _check_clip(features)
    keep_n = int((1 - merge_ratio) * n)
    keep = torch.ones(frames, n, dtype=torch.bool, device=features.device)

    def least_similar(a: int, b: int) -> None:
        sim = F.cosine_similarity(features[a].float(), features[b].float(), dim=1)  # [N]
        chosen = torch.sort(sim, stable=True).indices[:keep_n]  # the least similar, ties: lower index
        keep[b] = False
        keep[b, chosen] = True

    for i in range(0, frames - 1, 2):
        least_similar(i, i + 1)
    for i in range(0, frames - 4, 4):
        least_similar(i, i + 2)
    return torch.nonzero(keep.flatten()).flatten()


# ------------------------------------------------------------------------------------------------------ PruneVid

def _prunevid_dpc(x: torch.Tensor, count: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PruneVid's ``cluster_dpc_knn``: (cluster label [n] in 0..count-1, centres [count]); label i = the i-th
    centre by descending ρ·δ; every token joins its nearest centre (ties: the earlier centre in that order),
    centres themselves."""
    distance, score = dpc_density_scores(x, knn)
    centres = _top_scores(score, count)
    labels = distance[centres].argmin(dim=0)
    labels[centres] = torch.arange(centres.numel(), device=x.device)
    return labels, centres


def refine_segment_labels(labels: list[int]) -> list[int]:
    """PruneVid's ``refine_clusters`` (modeling_pllava.py L207-300) on frame cluster labels [T]: each cluster keeps
    its longest contiguous runs (a cluster whose runs are all single frames keeps none); every other run is
    relabelled, left to right, with the label of the longer neighbouring run (ties: the left one; no neighbour:
    0)."""
    labels = list(labels)
    refined = list(labels)
    frames = len(labels)
    for label in sorted(set(labels)):
        runs, i = [], 0
        while i < frames:
            if labels[i] == label:
                j = i
                while j + 1 < frames and labels[j + 1] == label:
                    j += 1
                runs.append((i, j))
                i = j + 1
            else:
                i += 1
        longest = max(e - s + 1 for s, e in runs)
        for s, e in runs:
            if longest == 1 or e - s + 1 != longest:
                refined[s:e + 1] = [-1] * (e - s + 1)
    i = 0
    while i < frames:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < frames and refined[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left = refined[start - 1]
            k = start - 1
            while k >= 0 and refined[k] == left:
                k -= 1
            left_len = start - k - 1
        if end < frames - 1:
            right = refined[end + 1]
            k = end + 1
            while k < frames and refined[k] == right:
                k += 1
            right_len = k - end - 1
        if left_len > right_len:
            new = left
        elif right_len > left_len:
            new = right
        else:
            new = left if left is not None else right
        refined[start:end + 1] = [0 if new is None else new] * (end - start + 1)
    return refined


def prunevid_segments(features: torch.Tensor, segment_ratio: float = 0.25, knn: int = 7) -> list[int]:
    """PruneVid's temporal segmentation (``merge_frames_dynamic`` L764-766): DPC-KNN clustering of the frame
    means [T, D] into int(T · ``segment_ratio``) clusters, refined (:func:`refine_segment_labels`), then cut
    wherever the label changes. Returns the segment lengths."""
    frames = features.shape[0]
    count = max(1, min(frames, int(frames * segment_ratio)))
    labels = _prunevid_dpc(features.float().mean(dim=1), count, min(knn, frames))[0].tolist()
    labels = refine_segment_labels(labels)
    sizes, run = [], 1
    for a, b in zip(labels[:-1], labels[1:], strict=True):
        if a == b:
            run += 1
        else:
            sizes.append(run)
            run = 1
    sizes.append(run)
    return sizes


def prunevid_merge(features: torch.Tensor, tau: float = 0.8, cluster_ratio: float = 0.5,
                   segment_ratio: float = 0.25, knn: int = 7, min_cluster: int = 14) -> tuple[ClipResult, list[dict]]:
    """PruneVid stage 1 (``merge_frames_dynamic``, L759-827) on one clip ``features`` [T, N, D].

    Segments = :func:`prunevid_segments`. In a segment of W frames, a position is static when its mean pairwise
    cosine over the W·(W−1) ordered frame pairs is above ``tau`` (a single frame has no static position);
    static positions are averaged over the segment; if more than ``min_cluster`` (14) of them, they are
    clustered (DPC-KNN, ``knn`` 7) into int(n · ``cluster_ratio``) cluster means. Each frame's dynamic tokens
    likewise (kept as they are when 14 or fewer). Returns the result and, per segment, the groups that the
    in-LLM stage selects from: ``{"static": [flat index of each static token], "dynamic": [[flat index of each
    token of frame w] for each frame]}`` -- a token is named by its own flat index (kept) or its anchor (merged).

    Merged tokens stand at their cluster centre: a static token at the centre's position in the segment's first
    frame, a dynamic one in its frame (the official code lays a segment out as [static tokens, dynamic tokens
    frame by frame]; vtprune keeps each token at a position of the clip). Deviation: a cluster step makes at
    least one cluster -- int(n · ``cluster_ratio``) is 0 for a few tokens at a small ratio (e.g. 15 dynamic
    tokens at 0.05), where the official top-k picks no centre and the assignment to the nearest centre fails.
    """
    frames, n, d = _check_clip(features)
    merges = _Merges(frames * n, d, features)
    keep: list[torch.Tensor] = []
    groups: list[dict] = []
    positions = torch.arange(n, device=features.device)
    offset = 0

    def cluster(feat: torch.Tensor, flat_rows: torch.Tensor, frame_anchor: torch.Tensor, coef_rows: float,
                collected: list[int]) -> None:
        """``feat`` [m, D]; ``flat_rows`` [m, R] the flat tokens each row averages (R frames)."""
        count = max(1, int(feat.shape[0] * cluster_ratio))   # at least one cluster (docstring)
        labels, centres = _prunevid_dpc(feat, count, min(knn, feat.shape[0]))
        members = torch.bincount(labels, minlength=count).to(feat.dtype)  # >= 1: a centre is its own member
        tokens = torch.zeros(count, feat.shape[1], dtype=feat.dtype, device=feat.device).index_add_(0, labels, feat)
        tokens = tokens / members[:, None]
        width = flat_rows.shape[1]
        rows = labels.repeat_interleave(width)
        values = (coef_rows / members)[labels].repeat_interleave(width)
        anchors = frame_anchor[centres]
        merges.block(tokens, anchors, rows, flat_rows.flatten(), values)
        collected.extend(anchors.tolist())

    for size in prunevid_segments(features, segment_ratio, knn):
        seg = features[offset:offset + size].float()  # [W, N, D]
        frames_of = torch.arange(offset, offset + size, device=features.device)
        if size > 1:
            unit = F.normalize(seg, dim=-1)
            sim = torch.einsum("wnc,tnc->wtn", unit, unit)  # [W, W, N]
            static = (sim.sum(dim=(0, 1)) - size) / (size * (size - 1)) > tau  # [N]
        else:
            static = torch.zeros(n, dtype=torch.bool, device=features.device)
        group = {"static": [], "dynamic": []}
        static_pos = positions[static]
        if static_pos.numel():
            mean = seg[:, static_pos].mean(dim=0)  # [n_s, D]
            rows = frames_of[None, :] * n + static_pos[:, None]  # [n_s, W]
            if static_pos.numel() > min_cluster:
                # a static cluster stands at its centre's position in the segment's first frame
                cluster(mean, rows, offset * n + static_pos, 1.0 / size, group["static"])
            else:  # each static position is one token (its mean over the segment)
                m = static_pos.numel()
                anchors = offset * n + static_pos
                merges.block(mean, anchors, torch.arange(m, device=features.device).repeat_interleave(size),
                             rows.flatten(), torch.full((m * size,), 1.0 / size))
                group["static"].extend(anchors.tolist())
        dynamic_pos = positions[~static]
        for w in range(size):
            t = offset + w
            collected: list[int] = []
            if dynamic_pos.numel() > min_cluster:
                cluster(seg[w, dynamic_pos], (t * n + dynamic_pos)[:, None], t * n + dynamic_pos, 1.0, collected)
            elif dynamic_pos.numel():
                keep.append(t * n + dynamic_pos)
                collected = (t * n + dynamic_pos).tolist()
            group["dynamic"].append(collected)
        groups.append(group)
        offset += size
    kept = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long, device=features.device)
    return merges.result(kept), groups


# ---------------------------------------------------------------------------------------------- VisionZip video

def visionzip_video_select(features: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor,
                           spatial_tokens: int = 50, dominant_ratio: float = 54 / 64) -> ClipResult:
    """VisionZip per frame, as ported to LLaVA-OneVision video in cokeshao/HoliTom ``visionzip/llava_arch.py``
    L61-183: every frame keeps int(``spatial_tokens`` · ``dominant_ratio``) dominant tokens (top ``attention``)
    and the rest of ``spatial_tokens`` as contextual tokens (uniformly strided targets among the others, every
    other token merged into the target with the most cosine-similar key: target + mean(merged)).

    ``features`` [T, N, D] (pooled projected frames), ``keys`` [T, N, dk] (pooled keys), ``attention`` [T, N].
    """
    frames, n, d = _check_clip(features, keys=keys, attention=attention)
    dominant = min(n, int(spatial_tokens * dominant_ratio))
    contextual = max(0, min(spatial_tokens, n) - dominant)
    merges = _Merges(frames * n, d, features)
    keep = []
    for t in range(frames):
        r = visionzip_select(features[t], keys[t], attention[t].float(), dominant, contextual)
        keep.append(t * n + r.keep)
        c = r.anchors.numel()
        if not c:
            continue
        is_other = r.assignment >= 0
        is_other[r.anchors] = False
        others = torch.nonzero(is_other).flatten()  # merged into a target
        target = r.assignment[others]
        counts = torch.bincount(target, minlength=c).clamp(min=1).to(torch.float32)
        rows = torch.cat([torch.arange(c, device=features.device), target])
        cols = t * n + torch.cat([r.anchors, others])
        values = torch.cat([torch.ones(c, device=features.device), 1.0 / counts[target]])
        merges.block(r.merged, t * n + r.anchors, rows, cols, values)
    return merges.result(torch.cat(keep))
