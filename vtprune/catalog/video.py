"""Video token-reduction methods (issue 14): HoliTom, FastVID, DyCoke, PruneVid, VisionZip-video.

Each pre-LLM stage sees a whole clip (``video_policy = "clip"``: :meth:`select_clip` on a
:class:`~vtprune.registry.VideoClip`); the cores are the pure functions of :mod:`vtprune.selectors.video`. A method
that has further stages brings them as :meth:`~vtprune.registry.Method.companions` (HoliTom's inner-LLM merge,
PruneVid's in-LLM selection, DyCoke's decode-time KV pruning), switchable by an option.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BudgetError, MethodOptionError
from ..registry import Method, Selection, VideoClip, VisualGroup, register_method
from ..selectors.video import (
    ClipResult,
    dycoke_ttm,
    fastvid_select,
    holitom_select,
    prunevid_merge,
    visionzip_video_select,
)
from .decode import DyCokeDecode
from .video_llm import HoliTomInner, PruneVidLLM, _check_fraction, _check_int

__all__ = ["DyCoke", "FastVID", "HoliTom", "PruneVid", "VisionZipVideo"]


def _as_clip(group: VisualGroup) -> VideoClip:
    """An image (group) as a one-frame clip."""
    n = group.num_tokens
    h, w = (group.height, group.width) if group.height and group.width else (1, n)
    return VideoClip(features=group.features[None], height=h, width=w, frames=1,
                     signals={k: v[None] for k, v in group.signals.items()}, project=group.project, seed=group.seed)


def _selection(result: ClipResult) -> Selection:
    return Selection(keep=result.keep, merged=result.merged, anchors=result.anchors, weights=result.weights)


def _ratio(budget: Any, k: int, total: int) -> float:
    """The retention ratio a budget means for a clip of ``total`` tokens kept to ``k``."""
    return float(budget) if isinstance(budget, float) else k / total


# -------------------------------------------------------------------------------------------------- HoliTom

@register_method
class HoliTom(Method):
    """HoliTom — holistic token merging for video LLMs (Shao et al., NeurIPS 2025, arXiv 2505.21334; official code
    cokeshao/HoliTom @ e9b2972, ``holitom/llava_arch.py`` L29-407, ``holitom/modeling_qwen2.py`` L121-208).

    Outer-LLM (this stage, on the whole clip): the frames are split into windows by a dynamic programme that
    maximises the tokens saved by temporal merging (same-position cosine above ``tau`` in every pair of a window);
    static positions are averaged over their window and clustered by DPC-KNN (``k`` neighbours, centre weight
    ``beta``) into round(n · ρ') tokens standing at the window's first frame; each frame's dynamic tokens keep the
    top ceil(n · ρ') by the vision encoder's attention (``d`` = 0: no DPC-KNN share among them), with ρ' the budget
    rescaled by the tokens the windows saved. The budget is therefore a cap, as in the official code (ρ' = min(ρ /
    (left / T·N), 1)): on a clip whose windows leave fewer tokens than the budget, everything left is kept and
    fewer tokens than the budget reach the LLM (on the mostly static clips of the video micro-VLM, 8 × 16 tokens,
    32 are left on average, so 50 % and 25 % both keep about 32). Inner-LLM (companion ``holitom_inner``,
    ``inner=True``): at decoder layer ``inner_layer`` (official 18 of Qwen2-7B's 28; by default the same fraction of this model's depth) the
    visual tokens keep the top round(N · (1 − ``inner_ratio``)) by the last prompt token's attention and every
    other token is averaged into its most similar kept token. Defaults: budget 0.1 (the official RETAIN_RATIO),
    ``tau`` 0.8 (the code default; the official 10 % script uses 0.65).

    Positions: ``compact`` (the official code rebuilds the sequence), the inner merge ``original``. Images: a
    one-frame clip (the dynamic rule: top-k by attention). Deviations: the attention is the vision encoder's mean
    received attention as the adapter captures it (official: SigLIP's last kept layer, eager); LLaVA-OneVision's
    per-row newlines of the official ``grid`` mode are not in the HF model (one trailing newline, kept); ties in
    DPC-KNN densities go to the lower index (official: 1e-6 random noise; with one static cluster the official
    centre is random); when the ceil rounding of the official per-frame counts exceeds the clip's budget, the
    lowest-attention kept dynamic tokens are dropped so that the budget holds.
    """

    name = "holitom"
    paper = "HoliTom (NeurIPS'25)"
    signals = ("cls_attention",)
    options = {"tau": 0.8, "beta": 0.6, "d": 0.0, "k": 7, "max_window": 1024, "inner": True, "inner_layer": None,
               "inner_ratio": 0.5}
    default_budget = 0.1
    default_positions = "compact"
    video_policy = "clip"
    exact_count = False
    solo = {"inner": False}

    def validate_options(self) -> None:
        c = self.config
        _check_fraction(self.name, "tau", c["tau"], -1.0, 1.0)
        _check_fraction(self.name, "beta", c["beta"])
        _check_fraction(self.name, "d", c["d"])
        _check_int(self.name, "k", c["k"])
        _check_int(self.name, "max_window", c["max_window"], 2)
        if not isinstance(c["inner"], bool):
            raise MethodOptionError("holitom inner= must be True or False (the inner-LLM merge stage).")

    def companions(self) -> list[Method]:
        if not self.config["inner"]:
            return []
        ratio = 0.0 if self.budget == 1.0 else self.config["inner_ratio"]  # budget 1.0: nothing pruned anywhere
        return [HoliTomInner(layer=self.config["inner_layer"], ratio=ratio)]

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        c = self.config
        result = holitom_select(clip.features, clip.signals["cls_attention"], _ratio(self.budget, k, clip.num_tokens),
                                tau=c["tau"], beta=c["beta"], dominant_share=c["d"], knn=c["k"],
                                max_window=c["max_window"], max_tokens=k)
        return _selection(result)

    def select(self, group: VisualGroup, k: int) -> Selection:
        return self.select_clip(_as_clip(group), k)


# -------------------------------------------------------------------------------------------------- FastVID

@register_method
class FastVID(Method):
    """FastVID — dynamic density pruning for video LLMs (Shen et al., NeurIPS 2025, arXiv 2503.11187; official code
    LunarShen/FastVID @ a40a109, ``fastvid_llavaonevision/.../language_model/modeling_qwen2.py`` L900-1075,
    defaults ``fastvid_llavaonevision/scripts/eval.sh``).

    DySeg: the clip is cut after frame t when the cosine of consecutive frame vectors is among the ``c`` − 1
    lowest or below ``tau``. STPrune: every frame keeps (its share of the budget) × (1 − ``d``) salient tokens (top
    [CLS]-like attention, as they are); the context share goes to anchor frames (every ``p``-th frame from each
    segment's end), whose DPC-KNN density peaks absorb the segment's other non-salient tokens (most cosine-similar
    peak; w = max(1 / (count + 1), ``beta``) on the peak). Each frame keeps int(N · retention) tokens, as the
    official code (a clip of 8 frames × 16 tokens at 0.1 keeps 8, not 12). Original positions. Defaults: budget 0.1
    (the official retention ratio), c 8, tau 0.9, d 0.4, p 4, beta 0.6 (LLaVA-OneVision; the official Qwen2.5-VL script uses tau
    0.84 and a sub-split at 0.95, not reproduced: pass tau=0.84).

    Deviations: the frame vector is the mean of the frame's projected tokens and the saliency the vision encoder's
    mean received attention (official LLaVA-OneVision: SigLIP's attention-pooling head — its pooled output and its
    probe's attention —, which the HF SigLIP tower of LLaVA-OneVision does not have; official Qwen2.5-VL: the mean
    of the frame's merged tokens, as here, and the attention of the frame-mean query in the last ViT block);
    densities tie to the lower index (official: 1e-6 noise) and equal similarities are cut earliest first. Images:
    a one-frame clip (salient tokens + density merging within the frame).
    """

    name = "fastvid"
    paper = "FastVID (NeurIPS'25)"
    signals = ("cls_attention",)
    options = {"c": 8, "tau": 0.9, "d": 0.4, "p": 4, "beta": 0.6}
    default_budget = 0.1
    default_positions = "original"
    video_policy = "clip"
    exact_count = False

    def validate_options(self) -> None:
        c = self.config
        _check_int(self.name, "c", c["c"])
        _check_int(self.name, "p", c["p"])
        _check_fraction(self.name, "tau", c["tau"], -1.0, 1.0)
        _check_fraction(self.name, "d", c["d"])
        _check_fraction(self.name, "beta", c["beta"])

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        c = self.config
        features = clip.features
        result = fastvid_select(features, clip.signals["cls_attention"], features.float().mean(dim=1),
                                frame_keep=k // clip.frames, context_share=c["d"], anchor_period=c["p"],
                                beta=c["beta"], cuts=c["c"], tau=c["tau"])
        return _selection(result)

    def select(self, group: VisualGroup, k: int) -> Selection:
        return self.select_clip(_as_clip(group), k)


# --------------------------------------------------------------------------------------------------- DyCoke

def _dycoke_layout(frames: int) -> tuple[int, int]:
    """(whole frames, pruned frames) of DyCoke's TTM pattern on ``frames`` frames."""
    pruned = set(range(1, frames, 2)) if frames > 1 else set()
    pruned |= {i + 2 for i in range(0, frames - 4, 4)}
    return frames - len(pruned), len(pruned)


@register_method
class DyCoke(Method):
    """DyCoke — dynamic compression of tokens for video LLMs (Tao et al., CVPR 2025, arXiv 2411.15024; official code
    KD-TAO/DyCoke @ dd74634, ``llava/model/llava_arch.py`` L35-91, ``llava/model/language_model/modeling_qwen2.py``
    L55-115 and L1136-1158, defaults ``lmms_eval/models/llava_onevision.py`` L83-93).

    Stage 1 (this stage, temporal token merging): in pairs of frames the second keeps the int((1 − ``k``)·N)
    tokens least similar to the first at the same position; in each group of four (all but the last) frame 2
    likewise against frame 0 (redundant tokens are dropped). Stage 2 (companion ``dycoke_decode``,
    ``decode=True``): at every decode step, decoder layers from ``layer`` on attend to the visual KV entries the
    current token attends to most at layer ``layer`` − 1 (top (1 − ``p``)), re-chosen when the attention pattern
    changes (cosine to the previous step below ``threshold``) — see :class:`~vtprune.catalog.decode.DyCokeDecode`
    and the decode stage of the engine. Defaults as the official lmms-eval settings: k 0.7, layer 3, p 0.8,
    threshold 0.9.

    Budget: None keeps the official ``k`` (49.4 % of a 32-frame clip) within a cap of half the clip (short clips,
    whose whole frames weigh more, get the per-frame count that fits); an explicit budget replaces ``k`` by the
    per-frame count that keeps the clip within it (the whole frames of the pattern are never cut: a budget below
    them is refused). Positions ``compact`` (the official code rebuilds the sequence). Images are refused (one
    frame, nothing to merge across time): use ``dycoke_decode`` alone there. Deviation: an unpaired last frame (odd T)
    stays whole (the official code drops it from the sequence).
    """

    name = "dycoke"
    paper = "DyCoke (CVPR'25)"
    options = {"k": 0.7, "decode": True, "layer": 3, "p": 0.8, "threshold": 0.9}
    default_budget = 0.5
    default_positions = "compact"
    video_policy = "clip"
    exact_count = False
    solo = {"decode": False}
    image_unsupported = ("DyCoke merges tokens across the frames of a video; an image has one frame. For images use "
                         "its decode stage alone (vtprune.apply(model, 'dycoke_decode')) or an image method.")

    def __init__(self, budget=None, positions: str | None = None, seed: int = 0, **options: Any):
        super().__init__(budget=budget, positions=positions, seed=seed, **options)
        self._explicit_budget = budget is not None

    def validate_options(self) -> None:
        _check_fraction(self.name, "k", self.config["k"], 0.0, 0.999)
        if not isinstance(self.config["decode"], bool):
            raise MethodOptionError("dycoke decode= must be True or False (the decode-time KV pruning stage).")
        DyCokeDecode(layer=self.config["layer"], p=self.config["p"], threshold=self.config["threshold"])

    def companions(self) -> list[Method]:
        if not self.config["decode"]:
            return []
        p = 0.0 if self.budget == 1.0 else self.config["p"]  # budget 1.0: nothing pruned anywhere
        return [DyCokeDecode(layer=self.config["layer"], p=p, threshold=self.config["threshold"])]

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        n = clip.tokens_per_frame
        ratio = self.config["k"]
        whole, pruned = _dycoke_layout(clip.frames)
        official = whole * n + pruned * int((1 - ratio) * n)
        if self._explicit_budget or official > k:
            if pruned == 0:
                return Selection(keep=torch.arange(clip.num_tokens, device=clip.features.device))
            if k < whole * n:
                raise BudgetError(f"dycoke keeps {whole} of the clip's {clip.frames} frames whole, so the smallest "
                                  f"budget it can meet is {whole * n} tokens ({whole * n / clip.num_tokens:.3f} of the "
                                  "clip); raise the budget.")
            per_frame = min(n, (k - whole * n) // pruned)
            ratio = 1 - (per_frame + 0.5) / n  # int((1 - ratio) * n) == per_frame
        return Selection(keep=dycoke_ttm(clip.features, ratio))

    def select(self, group: VisualGroup, k: int) -> Selection:
        raise MethodOptionError(f"dycoke cannot prune an image: {self.image_unsupported}")


# ------------------------------------------------------------------------------------------------- PruneVid

@register_method
class PruneVid(Method):
    """PruneVid — visual token pruning for video LLMs (Huang et al., ACL 2025 Findings, arXiv 2412.16117; official
    code Visual-AI/PruneVid @ b12600c, ``models/pllava/modeling_pllava.py`` L111-300 and L759-827,
    ``models/pllava/elastic_cache.py`` L108-207, defaults ``scripts/eval.sh``).

    Stage 1 (this stage): frames are clustered (DPC-KNN on frame means, int(T · ``temporal_segment_ratio``)
    clusters, refined into contiguous segments); in each segment, positions whose mean pairwise cosine exceeds
    ``tau`` are static and averaged over the segment; static tokens and each frame's dynamic tokens are clustered
    (DPC-KNN, ``k`` 7) into int(n · ``cluster_ratio``) cluster means when there are more than 14. Stage 2
    (companion ``prunevid_llm``, ``llm=True``): at decoder layer ``layer`` (official 10 of PLLaVA's 32, scaled to
    this depth by default) the visual tokens keep the top int(N · ``alpha``) by the attention the text after the
    video pays them (max over heads and query tokens, from q/k). Defaults as the official script: tau 0.8,
    cluster_ratio 0.5, temporal_segment_ratio 0.25, alpha 0.4.

    Budget: the paper has none (its retention follows from the options); the budget (default 0.5) caps stage 1: a
    clip whose stage-1 output exceeds it is clustered again with the cluster ratio scaled down (and no 14-token
    floor) until it fits. Positions ``original``; a merged token stands at its cluster centre (a static one in the
    segment's first frame; the official code lays a segment out as [static, dynamic frame by frame]). Deviations:
    stage 2 ranks all the clip's visual tokens together (official: top int(alpha · n) within each static set and
    each frame's dynamic tokens) and leaves the KV cache of the layers before ``layer`` whole (the official code
    gathers the caches of layers 0..``layer`` too); densities tie to the lower index (official: 1e-6 noise).
    Images: a one-frame clip (its tokens clustered to ``cluster_ratio`` when more than 14).
    """

    name = "prunevid"
    paper = "PruneVid (ACL'25 Findings)"
    options = {"tau": 0.8, "cluster_ratio": 0.5, "temporal_segment_ratio": 0.25, "k": 7, "llm": True,
               "layer": None, "alpha": 0.4}
    default_budget = 0.5
    default_positions = "original"
    video_policy = "clip"
    exact_count = False
    solo = {"llm": False}

    def validate_options(self) -> None:
        c = self.config
        _check_fraction(self.name, "tau", c["tau"], -1.0, 1.0)
        _check_fraction(self.name, "cluster_ratio", c["cluster_ratio"], 0.01, 1.0)
        _check_fraction(self.name, "temporal_segment_ratio", c["temporal_segment_ratio"], 0.0, 1.0)
        _check_fraction(self.name, "alpha", c["alpha"], 0.01, 1.0)
        _check_int(self.name, "k", c["k"])
        if not isinstance(c["llm"], bool):
            raise MethodOptionError("prunevid llm= must be True or False (the in-LLM selection stage).")

    def companions(self) -> list[Method]:
        if not self.config["llm"]:
            return []
        alpha = 1.0 if self.budget == 1.0 else self.config["alpha"]  # budget 1.0: nothing pruned anywhere
        return [PruneVidLLM(layer=self.config["layer"], alpha=alpha)]

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        c = self.config
        ratio, floor = c["cluster_ratio"], 14
        for _ in range(8):
            result, _groups = prunevid_merge(clip.features, tau=c["tau"], cluster_ratio=ratio,
                                             segment_ratio=c["temporal_segment_ratio"], knn=c["k"], min_cluster=floor)
            if result.num_tokens <= k:
                return _selection(result)
            ratio, floor = ratio * k / result.num_tokens * 0.98, 0
        raise BudgetError(f"prunevid cannot fit this clip into {k} tokens; raise the budget.")

    def select(self, group: VisualGroup, k: int) -> Selection:
        return self.select_clip(_as_clip(group), k)


# ------------------------------------------------------------------------------------------ VisionZip video

@register_method
class VisionZipVideo(Method):
    """VisionZip on video, per frame (Yang et al., CVPR 2025, arXiv 2412.04467; the video port for
    LLaVA-OneVision in cokeshao/HoliTom @ e9b2972 ``visionzip/llava_arch.py`` L61-183 — the official
    dvlab-research/VisionZip has no video code): every frame keeps ``spatial_tokens`` tokens, int(spatial ·
    ``dominant_ratio``) dominant ones (top attention) and the rest as contextual tokens (uniformly strided targets
    absorbing the other tokens with the most similar key: target + mean). ``spatial_tokens`` None = the frame's
    share of the budget (k // T); the port's default is 50 per 196-token frame ≈ the default budget 0.25.
    Positions ``compact`` (the port rebuilds the sequence). Images: one frame. Deviation: the attention and keys
    are those the adapter captures (mean received attention and head-mean keys of the vision encoder's feature
    layer; the port pools SigLIP's last-layer attention and keys 2×2 like the features)."""

    name = "visionzip_video"
    paper = "VisionZip (CVPR'25), video port"
    signals = ("cls_attention", "vit_keys")
    options = {"spatial_tokens": None, "dominant_ratio": 54 / 64}
    default_budget = 0.25
    default_positions = "compact"
    video_policy = "clip"
    exact_count = False

    def validate_options(self) -> None:
        if self.config["spatial_tokens"] is not None:
            _check_int(self.name, "spatial_tokens", self.config["spatial_tokens"])
        _check_fraction(self.name, "dominant_ratio", self.config["dominant_ratio"])

    def budget_overrides(self) -> list[str]:
        return ["spatial_tokens"] if self.config["spatial_tokens"] is not None else []

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        spatial = self.config["spatial_tokens"] or max(1, k // clip.frames)
        spatial = min(spatial, k // clip.frames if k >= clip.frames else spatial, clip.tokens_per_frame)
        keys = clip.signals["vit_keys"]
        result = visionzip_video_select(clip.features, keys.reshape(clip.frames, clip.tokens_per_frame, -1),
                                        clip.signals["cls_attention"], spatial, self.config["dominant_ratio"])
        return _selection(result)

    def select(self, group: VisualGroup, k: int) -> Selection:
        return self.select_clip(_as_clip(group), k)
