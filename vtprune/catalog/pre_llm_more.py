"""Pre-LLM methods of issue 17: VisPruner, HiPrune, PruMerge / PruMerge+, CDPruner, MustDrop.

Registry glue only: each class reads the signals the engine captured for a :class:`VisualGroup` and calls a
pure function of ``vtprune.selectors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..engine.attention_rows import attention_rows
from ..errors import BudgetError, MethodOptionError
from ..registry import Method, Selection, VisionTower, VisualGroup, register_method
from ..selectors.cdpruner import cdpruner_relevance, cdpruner_select
from ..selectors.cls_attention import topk_select
from ..selectors.hiprune import anchor_count, hiprune_select
from ..selectors.mustdrop import (
    dual_attention_keep,
    key_set_count,
    mustdrop_merge,
    threshold_windows,
    window_scores,
    windows_for_budget,
)
from ..selectors.prumerge import iqr_outlier_count, prumerge_indices, prumerge_merge
from ..selectors.vispruner import split_vispruner_budget, vispruner_select
from .in_llm import (
    LayerContext,
    LayerMethod,
    LayerSelection,
    _ascending_layers,
    geometric_layer_average,
    geometric_ratio,
)
from .video_llm import _check_fraction


def _fraction(method: str, name: str, value: Any, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (0 < value if low_open else 0 <= value) and value <= 1):
        bound = "(0, 1]" if low_open else "[0, 1]"
        raise MethodOptionError(f"{method} option {name}={value!r} must be a number in {bound}.")


@register_method
class VisPruner(Method):
    """VisPruner — important tokens by [CLS] attention + diverse tokens by iterative similarity removal (Zhang
    et al., ICCV 2025, arXiv 2412.01818 v2 "Beyond Text-Visual Attention"; official code Theia-4869/VisPruner @
    aefa01a, ``llava/model/llava_arch.py`` L140-186, ``llava/model/multimodal_encoder/clip_encoder.py`` L35-71,
    ``siglip_encoder.py`` L34-40; defaults in ``llava/eval/model_vqa_loader.py`` L151-152).

    Of the ``k`` tokens of an image, ``int(k * important_ratio)`` (default ``important_ratio=0.5``) are the
    top by the head-mean attention of the [CLS] query at the feature layer (LLaVA: the penultimate layer,
    ``attentions[-2]``; computed from that layer's q/k, the tower stays on SDPA); the rest, in descending
    attention order, are thinned 8 at a time (split alternately, drop the A tokens most cosine-similar to a B
    token, by the projector's input features) until ``k - int(k * important_ratio)`` remain. No merging;
    kept tokens in raster order, positions ``compact`` (official: the pruned features are spliced in and the
    sequence numbered 0..L-1). LLaVA-NeXT: the budget applies per crop, the same count for the base image and
    every crop (``equal_per_crop``; the official ``visual_token_num`` is that per-crop count, e.g. 32 -> 160
    for 5 crops). Default 64 tokens.

    Encoders without a [CLS] token: the official SigLIP variant scores a patch by the mean attention it
    receives in the last layer (mean over queries and heads) — the ``cls_attention`` fallback of this family
    (OneVision's feature layer is the last); the Qwen-VL ViTs (no official code) likewise, per 2x2 merger group
    (mean of its 4 patches, window order undone), with the group's 4 concatenated patch states as features.
    Deviations: ties in the attention ranking go to the lower index (the official ``argsort`` is unstable);
    an odd residual length (which the official indexing cannot handle) splits A = ``ceil(R / 2)``; LLaVA-NeXT
    crops are ranked on their unpadded patches (the official code uses the 'spatial' merge without unpadding).
    """

    name = "vispruner"
    paper = "arXiv:2412.01818"
    signals = ("cls_attention", "vit_hidden")
    options = {"important_ratio": 0.5}
    budget_policy = "equal_per_crop"
    default_positions = "compact"

    def validate_options(self) -> None:
        _fraction(self.name, "important_ratio", self.config["important_ratio"])

    def select(self, group: VisualGroup, k: int) -> Selection:
        important, diverse = split_vispruner_budget(k, self.config["important_ratio"])
        s = group.signals
        return Selection(keep=vispruner_select(s["cls_attention"], s["vit_hidden"], important, diverse))


#: HiPrune's object layer, 1-indexed, and the depth of the encoder the paper chose it for
_HIPRUNE_OBJECT = {"clip": (9, 24), "qwen": (16, 32)}


@register_method
class HiPrune(Method):
    """HiPrune — anchors, buffers and registers from the vision encoder's attention hierarchy (arXiv
    2508.00553; official code Danielement321/HiPrune @ 6e83a12, ``LLaVA/llava/model/llava_arch.py`` L140-182,
    ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` L558-577 and L1854-1893; defaults in its README table).

    Signal: the attention each patch *receives* in a vision block, mean over heads and over every query row
    (the [CLS] query included; the [CLS] column dropped), computed from the block's q/k (the tower stays on
    SDPA; the official code needs eager ``output_attentions``). Of ``k`` tokens: ``round(k * alpha / 5)``
    anchors (``alpha=0.1``) are the top by the attention received in the *object layer*; their 4 neighbours
    (``i ± 1``, ``i ± width``, clamped to the group, no row-wrap check — as the official code) are buffers;
    the remaining ``k - |anchors ∪ buffers|`` registers are the top other tokens by the attention received in
    the *deep layer* — the feature layer (LLaVA: ``mm_vision_select_layer=-2``; Qwen: the last block). Kept
    tokens in raster order.

    ``object_layer`` is 1-indexed as the official ``HIPRUNE_OBJECT_LAYER``: default 9 for CLIP/SigLIP towers
    (24-layer CLIP-L) and 16 for the Qwen-VL ViTs (32 blocks), scaled to the depth of another tower
    (``round(l * depth / reference)``, at least 1; e.g. 1 for the 3-layer test towers). LLaVA-OneVision's
    SigLIP (no official code) uses the CLIP default. Budget: LLaVA-1.5 ``k`` per image; LLaVA-NeXT the same count
    per crop (official: ``HIPRUNE_RETENTION / B``; ``equal_per_crop``); Qwen: per image (official: a ratio of the
    image's tokens; pass a float budget for that). Positions: LLaVA ``compact`` as the official code (default);
    the official Qwen2.5-VL code keeps original M-RoPE ids: pass ``positions="original"`` there.

    Deviations: Qwen's received attention is the mean (not the sum) over each attention segment's queries —
    the same ranking on full-attention blocks (the default object and deep blocks of Qwen2.5-VL-7B are such);
    registers exclude anchors and buffers outright (the official subtracts 1 from their score, which is the
    same while scores are means ≤ 1, not with Qwen's sums); ties go to the lower index; when anchors and
    buffers alone exceed ``k`` (tiny budgets; the official code then fails) the anchor count is lowered.
    """

    name = "hiprune"
    paper = "arXiv:2508.00553"
    signals = ("received_attention", "grid")
    options = {"alpha": 0.1, "object_layer": None}
    budget_policy = "equal_per_crop"
    default_positions = "compact"

    def validate_options(self) -> None:
        _fraction(self.name, "alpha", self.config["alpha"])
        layer = self.config["object_layer"]
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
            raise MethodOptionError(f"hiprune option object_layer={layer!r} must be an int >= 1 (1-indexed vision "
                                    "block, as HIPRUNE_OBJECT_LAYER; default 9 for CLIP, 16 for Qwen-VL).")

    def bind(self, tower: VisionTower) -> None:
        layer = self.config["object_layer"]
        if layer is None:
            reference, depth = _HIPRUNE_OBJECT["qwen" if tower.family.startswith("qwen") else "clip"]
            layer = max(1, round(reference * (tower.depth or depth) / depth))
        elif tower.depth is not None and layer > tower.depth:
            raise MethodOptionError(f"hiprune object_layer={layer} is beyond this vision encoder's {tower.depth} "
                                    f"blocks; pick 1..{tower.depth}.")
        self._object_signal = f"received_attention@{layer - 1}"
        self.signals = (self._object_signal, "received_attention@feature", "grid")

    def select(self, group: VisualGroup, k: int) -> Selection:
        if group.width is None or group.height is None or group.height * group.width != group.num_tokens:
            raise MethodOptionError("hiprune needs a rectangular patch grid (its buffers are grid neighbours), "
                                    "but this group is not one.")
        s = group.signals
        keep = hiprune_select(s[self._object_signal], s["received_attention@feature"], k, group.width,
                              anchor_count(k, self.config["alpha"]))
        return Selection(keep=keep)


class _PruMergeBase(Method):
    plus: bool = False
    signals = ("flat_cls_attention", "flat_keys", "vit_hidden")  # CLIP; without [CLS] see bind()
    options = {"layer": -1}
    default_budget = None  # the official count is adaptive (IQR outliers)
    budget_policy = "per_crop"
    default_positions = "compact"

    def __init__(self, budget=None, positions=None, seed: int = 0, **options):
        super().__init__(budget=budget, positions=positions, seed=seed, **options)
        self.adaptive = self.budget is None
        if self.adaptive:
            self.exact_count = False

    def validate_options(self) -> None:
        layer = self.config["layer"]
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise MethodOptionError(f"{self.name} option layer={layer!r} must be an int (a vision block index; -1 "
                                    "= the last, as the official layers[23] of CLIP-L).")

    def check_image_tokens(self, num_tokens: int) -> int:
        if self.adaptive:
            return num_tokens  # at most: the count is decided per image
        return super().check_image_tokens(num_tokens)

    def bind(self, tower: VisionTower) -> None:
        self._has_cls = tower.has_cls
        if tower.has_cls:
            layer = self.config["layer"]
            self._scores, self._keys = f"flat_cls_attention@{layer}", f"flat_keys@{layer}"
        else:  # no [CLS]: mean received attention and head-mean keys of the feature layer
            self._scores, self._keys = "cls_attention", "vit_keys"
        self.signals = (self._scores, self._keys, "vit_hidden")

    def select(self, group: VisualGroup, k: int) -> Selection:
        s = group.signals
        scores, keys, hidden = s[self._scores], s[self._keys], s["vit_hidden"]
        n = group.num_tokens
        if self.adaptive:
            outliers = max(1, iqr_outlier_count(scores))
            kept = prumerge_indices(scores, outliers, self.plus)[: n - 1]  # room for the extra token
        else:
            outliers = iqr_outlier_count(scores) if self.plus else 0
            kept = prumerge_indices(scores, outliers, self.plus, budget=k - 1)
        result = prumerge_merge(hidden, keys, scores, kept)
        device = group.features.device
        m = kept.numel()
        merged = group.project(result.merged)
        if self.positions == "original" or not self._has_cls:
            # each token at its own patch, the extra token at the last pruned patch
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[kept.cpu()] = False
            last_dropped = torch.nonzero(dropped).flatten()[-1:].to(device)
            anchors = torch.cat([kept.to(device), last_dropped])
            order = torch.ones(m + 1, dtype=torch.long, device=device)
        else:  # the official sequence: kept tokens in the official order, then the extra token
            anchors = torch.zeros(m + 1, dtype=torch.long, device=device)
            order = torch.arange(1, m + 2, device=device)
        return Selection(keep=torch.empty(0, dtype=torch.long, device=device), merged=merged, anchors=anchors,
                         weights=result.weights, order=order)


_PRUMERGE_DOC = """

    Score: the [CLS] row of ``softmax(q k^T / sqrt(C))`` in the vision tower's last block (``layer=-1``; the
    official forward hooks on ``layers[23].q_proj/k_proj`` of CLIP-L), q and k full-width (one head spanning
    all ``C`` channels), computed from the block's input by its own projections. Merge: every kept token
    ``x_i`` becomes ``x_i + sum_j a_j x_j`` over the 32 tokens (kept or not) whose full-width keys are most
    cosine-similar to its key (``a``: the scores; not normalised, as the official code); one extra token
    ``sum_j a_j x_j`` over the pruned tokens is appended. All in the projector's input space (the penultimate
    layer's features), then projected. Positions ``compact`` (official): the image's tokens are the kept tokens
    in the official order (descending score{plus_order}), then the extra token; ``positions="original"`` puts
    each at its own patch's position and the extra token at the last pruned patch's. Encoders without [CLS]
    always place them so (raster order; Qwen3-VL's deepstack rows need one token per anchor).

    Budget: ``budget=None`` (default) is the official adaptive count: the scores above ``Q3 + 1.5 IQR``
    (quartiles as ``numpy.percentile``){plus_adaptive}, +1 extra token, per image (and per crop).
    With a token budget ``k``: {fixed}, +1 extra token = exactly ``k`` tokens.

    Encoders without a [CLS] token (SigLIP, Qwen-VL; no official code, the method is defined on CLS): the
    score is the mean attention each token receives at the feature layer and the keys the head-averaged keys
    of that layer (Qwen: per 2x2 merger group, see ``fastervlm``/``visionzip``). Deviations: quartiles per
    image / crop (the official pools the whole batch); fewer than 33 tokens merge ``N - 1`` neighbours; an
    image without outliers keeps its top token (the official divides by zero); ties go to the lower index.
    """


@register_method
class PruMerge(_PruMergeBase):
    __doc__ = ("""PruMerge — adaptive [CLS]-attention outliers merged with their key-similar tokens (Shang et al.,
    ICCV 2025, arXiv 2403.15388; official code 42Shawn/LLaVA-PruMerge @ 097c041,
    ``llava/model/multimodal_encoder/clip_encoder.py`` L34-47, L85-171 ``token_prune_merge_advanced``).""" +
               _PRUMERGE_DOC.format(plus_order="", plus_adaptive="",
                                    fixed="the top ``k - 1`` tokens by score (the official ``if_adaptive=False`` "
                                          "path with ``reduction_ratio = (k - 1) / N``)"))

    name = "prumerge"
    paper = "arXiv:2403.15388"


@register_method
class PruMergePlus(_PruMergeBase):
    __doc__ = ("""PruMerge+ (registered as ``prumerge_plus``: ``+`` composes methods in vtprune) — PruMerge plus a
    spatially uniform supplement (Shang et al., ICCV 2025, arXiv 2403.15388; official code 42Shawn/LLaVA-PruMerge
    @ 097c041, ``llava/model/multimodal_encoder/clip_encoder.py`` L174-281 ``token_prune_merge_advanced_plus``,
    the default of its ``forward``).""" +
               _PRUMERGE_DOC.format(
                   plus_order=", then the supplement ascending",
                   plus_adaptive=", then the supplement ``arange(0, N - 1, int(int(1 / ratio) / 3))`` without the "
                                 "outliers (``ratio`` = outliers / N; about 3x as many tokens)",
                   fixed="the outliers (at most ``k - 1``), then tokens spread evenly over the remaining indices "
                         "up to ``k - 1`` (the official supplement follows the outlier count instead of a budget)"))

    name = "prumerge_plus"
    paper = "arXiv:2403.15388"
    plus = True


@register_method
class CDPruner(Method):
    """CDPruner — conditional DPP: diverse tokens weighted by their relevance to the instruction (Zhang et al.,
    NeurIPS 2025, arXiv 2506.10967; official code Theia-4869/CDPruner @ 9541616, ``llava/model/llava_arch.py``
    L140-187, ``llava/model/multimodal_encoder/clip_encoder.py`` L38-98).

    Kernel ``L = diag(r) S diag(r)``: ``S`` the cosine similarity of the projected visual tokens (the LLM's
    input embeddings, float32), ``r`` the relevance: ``mean_m(-cos(image_i, text_m))`` (the official code
    negates the cosine), min-max normalised over the image / crop; ``theta`` (commented out in the official
    code; default None = off) applies ``exp(theta / (2 (1 - theta)) r)``. Selection: fast greedy MAP of the
    DPP (Chen et al. 2018), ``k`` tokens, kept in raster order, positions ``compact`` (official). LLaVA-NeXT:
    the same count per crop (official ``visual_token_num`` per crop; ``equal_per_crop``). Default 64 tokens.

    Relevance signal: the official code runs a CLIP **text tower** on the instruction (77-token segments) and
    compares it with the image patches passed through CLIP's ``post_layernorm`` and ``visual_projection``. Pass
    both sides to get that: ``text_tower`` (callable: the instruction's token ids, LongTensor[T] in the VLM's
    vocabulary -> text embeddings [M, C]; decode them with your tokenizer and run your CLIP/SigLIP text model)
    and ``image_projection`` (callable: the projector's input [N, dv] -> [N, C]). **Deviation when none is
    given (the default)**: the relevance compares the projected visual tokens with the LLM's own input
    embeddings of the instruction — the prompt's text tokens after the image (all its text tokens if none
    follows), one "segment" per token; a prompt without text gets uniform relevance (a plain DPP). Other
    deviations: relevance normalised per image / crop (the official pools the batch); a constant relevance
    (max = min) becomes uniform instead of NaN; LLaVA-NeXT crops are unpadded (the official forces one
    672x672 grid without unpadding, ``mm_utils.py`` L28-30).
    """

    name = "cdpruner"
    paper = "arXiv:2506.10967"
    signals = ("instruction",)
    options = {"theta": None, "text_tower": None, "image_projection": None}
    budget_policy = "equal_per_crop"
    default_positions = "compact"

    def validate_options(self) -> None:
        theta = self.config["theta"]
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not 0 <= theta < 1):
            raise MethodOptionError(f"cdpruner option theta={theta!r} must be a number in [0, 1) or None (off).")
        tower, projection = self.config["text_tower"], self.config["image_projection"]
        if (tower is None) != (projection is None):
            raise MethodOptionError("cdpruner needs text_tower and image_projection together (the text and the image "
                                    "side of one CLIP/SigLIP space), or neither (the LLM's own embeddings).")
        for name, fn in (("text_tower", tower), ("image_projection", projection)):
            if fn is not None and not callable(fn):
                raise MethodOptionError(f"cdpruner option {name} must be callable, got {type(fn).__name__}.")
        if tower is not None:
            self.signals = ("instruction", "vit_hidden")

    def select(self, group: VisualGroup, k: int) -> Selection:
        features = group.features
        if self.config["text_tower"] is not None:
            if group.instruction_ids is None:
                raise MethodOptionError("cdpruner text_tower needs the prompt's input_ids; pass input_ids (not only "
                                        "inputs_embeds) to the model.")
            text = self.config["text_tower"](group.instruction_ids)
            image = self.config["image_projection"](group.signals["vit_hidden"])
        else:
            text, image = group.instruction, features
        if text is None or text.shape[0] == 0:
            relevance = torch.ones(group.num_tokens, device=features.device)
        else:
            relevance = cdpruner_relevance(image, text, self.config["theta"])
            if not bool(torch.isfinite(relevance).all()):
                relevance = torch.ones(group.num_tokens, device=features.device)
        return Selection(keep=cdpruner_select(features, relevance.to(features.device), k))


@register_method
class MustDrop(Method):
    """MustDrop — vision-encoding stage: similar spatially adjacent tokens merged window by window (Liu et al.
    2024, arXiv 2411.10803 "Multi-Stage Vision Token Dropping"; implemented as ModelTC/LightCompress @ 9701d03
    ``llmc/compression/token_reduction/mustdrop.py`` L28-227 with ``configs/sparsification/methods/MustDrop/
    mustdrop.yml``; the authors' code is liuting20/MustDrop @ 909afa5, ``multimodal_encoder/local_merge.py``,
    ``clip_encoder.py`` L89-112, ``language_model/modelling_sparse_llama.py`` L196-350).

    Stage 1 (this method, pre-LLM on the projector's input = the ViT feature layer's output, LightCompress's
    ``select_layer`` hook): the patch grid is tiled by non-overlapping ``window_size`` windows (default
    ``(3, 3)``); a window's score is the mean pairwise cosine similarity of its tokens; the ``r`` best windows
    each become one token, the mean of its tokens (the official size-weighted average with unit sizes), then
    projected; all other tokens stay. ``r``: with a token budget ``k`` per image (LightCompress's
    ``retained_tokens``; LLaVA-NeXT: per crop, ``equal_per_crop``) ``ceil((N - k) / (w - 1))``, so at most
    ``k`` tokens remain (``exact_count`` is False); with ``budget=None`` (default) the official adaptive count:
    the windows scoring at least ``spatial_threshold`` (default 0.6, LightCompress's config). ``merge``: None
    (default) follows LightCompress — LLaVA-1.5 and the other families merge; LLaVA-NeXT keeps each chosen
    window's bottom-right token unchanged and drops the other 8 (its ``index_masks`` path); True / False
    force one behaviour. Positions ``compact`` (LLaVA). With ``compact`` on a [CLS] encoder the image's tokens
    come in the official order: the merged tokens by descending window score, then the others in raster order;
    otherwise (``positions="original"``, encoders without [CLS]: Qwen3-VL's deepstack rows need one token per
    anchor) each merged token takes its window's bottom-right position (the official merge destination).

    Stages 2 and 3 (``prefill=True``, default): the companion in-LLM stage :class:`MustDropLLM` (``mustdrop_llm``,
    see its docstring) filters the visual tokens by text attention after decoder layers ``prefill_layers`` (None:
    the authors' 2, 6, 10, 14 of 32, scaled to the depth) with ``global_thr`` / ``individual_thr`` (default 0.001 /
    0.001, the authors' 192-token script), always keeping the key set (the ceil(``key_ratio`` · N) tokens with the
    highest [CLS] attention in the last ViT block, ``key_ratio=0.08``), and with ``cut_cache=True`` cuts the KV cache
    of the filtering layers to the survivors after the prefill (the decoding stage). The budget applies to stage 1
    (the count entering the LLM); stage 2 drops what the thresholds say on top (data dependent, per sample and
    layer; ``stats()`` reports the layer average). ``prefill=False`` (``solo``) runs stage 1 alone (LightCompress
    implements stage 1 only). ``budget=1.0`` prunes nothing in either stage.

    Deviations: ``r`` rounds up (the official ``(N + 1 - k) // (w - 1)`` counts the [CLS] token and can keep
    more or fewer than ``k``; the two agree at the paper's 64 / 128 / 192 on 576 tokens); grids not divisible
    by the window (the official asserts) leave the trailing rows / columns unmerged; the threshold count is per
    image / crop (the official takes the minimum over the batch); ties go to the earlier window; LLaVA-NeXT crops
    are windowed on their unpadded grids (the official windows the 24x24 crop, then unpads). The authors' own
    code merges after the first ViT block with threshold 0.8 (the ViT then runs on the merged tokens) — not
    LightCompress's placement, which this follows. Budgets below what merging every window leaves (``N / w`` for
    a divisible grid, e.g. 64 of 576 with 3x3) are refused with the smallest reachable one.
    """

    name = "mustdrop"
    paper = "arXiv:2411.10803"
    signals = ("vit_hidden",)
    options = {"spatial_threshold": 0.6, "window_size": (3, 3), "merge": None, "prefill": True,
               "prefill_layers": None, "global_thr": 0.001, "individual_thr": 0.001, "key_ratio": 0.08,
               "cut_cache": True}
    solo = {"prefill": False}
    default_budget = None  # the official adaptive count (windows at or above spatial_threshold)
    budget_policy = "equal_per_crop"
    default_positions = "compact"
    exact_count = False

    def __init__(self, budget=None, positions=None, seed: int = 0, **options):
        super().__init__(budget=budget, positions=positions, seed=seed, **options)
        self.adaptive = self.budget is None
        self._merge, self._official_order = True, True

    def validate_options(self) -> None:
        t = self.config["spatial_threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1 <= t <= 1:
            raise MethodOptionError(f"mustdrop option spatial_threshold={t!r} must be a cosine similarity in [-1, 1].")
        w = self.config["window_size"]
        if not (isinstance(w, (tuple, list)) and len(w) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in w) and w[0] * w[1] >= 2):
            raise MethodOptionError(f"mustdrop option window_size={w!r} must be two ints (height, width) >= 1 "
                                    "spanning at least 2 tokens, e.g. (3, 3).")
        self.config["window_size"] = (int(w[0]), int(w[1]))
        if self.config["merge"] not in (None, True, False):
            raise MethodOptionError(f"mustdrop option merge={self.config['merge']!r} must be None (LightCompress's "
                                    "choice per family), True or False.")
        if not isinstance(self.config["prefill"], bool):
            raise MethodOptionError(f"mustdrop option prefill={self.config['prefill']!r} must be True (the in-LLM "
                                    "filtering stage too) or False (the window merge alone).")
        self._companion()  # its options are checked now, before anything is installed

    def _companion(self) -> MustDropLLM:
        c = self.config
        nothing = self.budget == 1.0  # budget 1.0: nothing pruned anywhere
        stage = MustDropLLM(layers=c["prefill_layers"], global_thr=0.0 if nothing else c["global_thr"],
                            individual_thr=c["individual_thr"], key_ratio=c["key_ratio"], cut_cache=c["cut_cache"])
        stage.image_budget = self.budget if isinstance(self.budget, int) else None
        return stage

    def companions(self) -> list[Method]:
        return [self._companion()] if self.config["prefill"] else []

    def bind(self, tower: VisionTower) -> None:
        merge = self.config["merge"]
        self._merge = tower.family != "llava_next" if merge is None else merge
        self._official_order = tower.has_cls

    def _floor(self, num_tokens: int, height: int, width: int) -> int:
        wh, ww = self.config["window_size"]
        return num_tokens - (height // wh) * (width // ww) * (wh * ww - 1)

    def _refuse(self, k: int, num_tokens: int, height: int, width: int) -> BudgetError:
        wh, ww = self.config["window_size"]
        floor = self._floor(num_tokens, height, width)
        return BudgetError(
            f"mustdrop: budget={self.budget!r} asks for {k} of the {num_tokens} tokens of a {height}x{width} grid, "
            f"but merging every {wh}x{ww} window into one token leaves {floor}; raise the budget to at least "
            f"{floor} tokens per image (or crop), or pass a larger window_size.")

    def check_image_tokens(self, num_tokens: int) -> int:
        if self.adaptive:
            return num_tokens  # at most: the count is decided per image
        side = int(round(num_tokens ** 0.5))
        k = super().check_image_tokens(num_tokens)
        if side * side == num_tokens and k < self._floor(num_tokens, side, side):
            raise self._refuse(k, num_tokens, side, side)
        return k

    def select(self, group: VisualGroup, k: int) -> Selection:
        h, w, n = group.height, group.width, group.num_tokens
        device = group.features.device
        if h is None or w is None or h * w != n:
            raise MethodOptionError("mustdrop merges windows of a rectangular patch grid, but this group of visual "
                                    "tokens is not one.")
        hidden = group.signals["vit_hidden"]
        windows, scores = window_scores(hidden, h, w, self.config["window_size"])
        if self.adaptive:
            r = threshold_windows(scores, self.config["spatial_threshold"])
        else:
            r = windows_for_budget(n, k, self.config["window_size"])
            if r > windows.shape[0]:
                raise self._refuse(k, n, h, w)
        if r == 0:
            return Selection(keep=torch.arange(n, device=device))
        result = mustdrop_merge(hidden, windows, scores, r)
        if not self._merge:  # LightCompress on LLaVA-NeXT: the window's destination token stays as it is
            return Selection(keep=torch.sort(torch.cat([result.keep, result.dst])).values.to(device))
        merged = group.project(result.merged).to(group.features.dtype)
        if self.positions == "compact" and self._official_order:
            anchors = torch.zeros(r, dtype=torch.long, device=device)
            order = torch.arange(-r, 0, device=device)  # all before the image's first token, best window first
        else:
            anchors, order = result.dst.to(device), torch.ones(r, dtype=torch.long, device=device)
        return Selection(keep=result.keep.to(device), merged=merged, anchors=anchors, weights=result.weights,
                         order=order)


#: the authors' filtering layers (liuting20/MustDrop @ 909afa5 ``modelling_sparse_llama.py`` L103) on LLaVA-1.5-7B's
#: 32 decoder layers
_MUSTDROP_LAYERS, _MUSTDROP_DEPTH = (2, 6, 10, 14), 32


@dataclass
class _MustDropState:
    """One sample's prefilling state during one forward."""

    key: torch.Tensor                  # LongTensor: original positions of the key set (never dropped)
    entering: int | None = None        # visual tokens entering the first filter (budget mode)
    ratio: float | None = None         # budget mode: the kept fraction per filter (geometric)
    stage: int = 0                     # filters run so far


@register_method
class MustDropLLM(LayerMethod):
    """MustDrop's prefilling stage — text-guided dual-attention filtering inside the LLM (Liu et al. 2024, arXiv
    2411.10803; the authors' code liuting20/MustDrop @ 909afa5 ``llava/model/language_model/modelling_sparse_llama.py``
    L196-264 (the loop), L336-354 (``dual_attention_filter``), L266-309 (the decoding stage's cache cut);
    ``multimodal_encoder/clip_encoder.py`` L89-107 (the key set); thresholds in ``scripts/v1_5/eval/*.sh``).
    Installed by ``mustdrop`` (``prefill=True``, default) after its window merge; usable alone.

    After each filtering decoder layer l (``layers``; default the authors' 2, 6, 10, 14 of 32, scaled to this
    decoder's depth as ``l * depth // 32``, duplicates dropped, at most depth − 2), the attention of layer l (from its
    q/k: no eager attention) of every text token after the image to the visual tokens — softmax over each query's
    whole causal row, mean over heads, [T, V] — decides: a visual token is dropped when its attention summed over
    the T queries is below ``global_thr`` × the sum over all V tokens AND its largest single-query attention is below
    ``individual_thr``. The key set is never dropped: the ceil(``key_ratio`` · N) tokens (0.08 · 576 → 47) with the
    highest [CLS] attention (mean over heads) in the vision encoder's last block (``cls_attention@-1``; encoders
    without [CLS]: the adapter's ``cls_attention``, mean received attention of the feature layer). The drop takes
    effect from layer l + 1 on (this project's pruning point "before layer l + 1"; layer l itself, its KV cache
    included, saw every token, as in the official code). Positions ``compact`` (the official narrows
    ``position_ids``: the survivors are re-indexed after each drop).

    Decoding stage (``cut_cache=True``, default): after the prefill, the KV cache of layers ``layers[0]`` ..
    ``layers[-1]`` keeps only the visual tokens that survived the last filter (layers before ``layers[0]`` keep
    every token; later layers hold only the survivors already), and decode steps at those layers use the last
    filter's mask and positions, as the official per-layer cache cut and cache-length positions do. Only a
    ``DynamicCache`` is cut (a static cache, whose buffers are fixed, keeps the per-filter caches: ``cut_cache``
    has no effect there, and a warning says so).

    Thresholds: the official defaults are ``global_thr=1.0, individual_thr=0.0`` (nothing is dropped); the
    published scripts use (0.001, 0.001) for 192 tokens, (0.0012, 0.001) for 128 and (0.011, 0.01) for 64 on
    TextVQA, (0.005, 0.001) for 64 on VizWiz; the default here is the 192-token pair. Budget: ``None`` (default)
    = the thresholds decide (a data-dependent count per sample and layer). A float / int budget (equivalent visual
    tokens, averaged over layers, as for the other in-LLM methods) replaces the thresholds by counts: every
    filter keeps the same fraction of the visual tokens that entered the first one, solved so that the layer
    average meets the budget, and drops the tokens that the dual rule ranks lowest (rank: max(summed share /
    ``global_thr``, largest / ``individual_thr``), the official rule drops exactly the tokens ranked below 1); the
    key set is kept on top, so a budget below it is not met (``stats()`` reports what was kept).

    Deviations from the official code: (1) the key set is chosen among the tokens that enter the LLM unmerged,
    by their [CLS] attention in the ViT run on the unmerged patches (the official merges inside the ViT after its
    first block, so its merged tokens have their own attention; here stage 1 merges after the ViT, and merged
    tokens are never key tokens); its size is ceil(``key_ratio`` × the sample's visual tokens entering the LLM),
    per sample (the official: per image); (2) batches of any size, each sample with its own queries, key set and
    counts (official: batch 1); (3) the filtering layers are scaled to the decoder's depth (official: 2, 6, 10,
    14 and 32 layers hard-coded); (4) the text queries are the sample's text tokens after its last visual token
    (official: every token after the image span; the same for one image followed by the prompt); (5) the cache cut
    covers a dynamic cache only, and is skipped (each layer keeps the cache of what it processed, still correct)
    when the cache held tokens before the prefill; the official loop also hard-codes 32 layers there.
    Fidelity: tests/test_mustdrop_prefill.py transcribes the official prefill loop (eager weights of each
    filtering layer, ``dual_attention_filter``, key-set union, ``index_select`` of the hidden states with compact
    positions) and the official key set, and compares the kept tokens after every filter with ``stats()`` on the
    tiny LLaVA and the trained micro-llava; the rule and the key set also on random attention.
    """

    name = "mustdrop_llm"
    paper = "arXiv:2411.10803 (prefilling stage)"
    signals = ("decoder_attention", "cls_attention@-1")
    options = {"layers": None, "global_thr": 0.001, "individual_thr": 0.001, "key_ratio": 0.08, "cut_cache": True}
    default_budget = None  # the thresholds decide
    default_positions = "compact"
    adaptive = True

    def __init__(self, budget=None, positions=None, seed: int = 0, **options):
        super().__init__(budget=budget, positions=positions, seed=seed, **options)
        self.vision_signals = ("cls_attention@-1",)
        #: set by ``mustdrop``: its int budget (tokens per image); a sample whose visual tokens fit it is left
        #: unpruned here too (invariant 1: a budget at or above the visual tokens prunes nothing)
        self.image_budget: int | None = None

    def validate_options(self) -> None:
        c = self.config
        layers = c["layers"]
        if layers is not None and not _ascending_layers(layers, 0):
            raise MethodOptionError(f"mustdrop_llm layers={layers!r} must be strictly ascending decoder layer "
                                    "indices >= 0 (the layers whose attention filters), e.g. [2, 6, 10, 14].")
        for option in ("global_thr", "individual_thr", "key_ratio"):
            _check_fraction(self.name, option, c[option])
        if not isinstance(c["cut_cache"], bool):
            raise MethodOptionError("mustdrop_llm cut_cache= must be True or False.")

    def bind(self, tower: VisionTower) -> None:
        key = "cls_attention@-1" if tower.has_cls else "cls_attention"
        self.signals = ("decoder_attention", key)
        self.vision_signals = (key,)

    def filter_layers(self, num_layers: int) -> list[int]:
        """The decoder layers whose attention filters (the official 2, 6, 10, 14 of 32, scaled)."""
        layers = self.config["layers"]
        if layers is None:
            layers = sorted({min(layer * num_layers // _MUSTDROP_DEPTH, num_layers - 2) for layer in _MUSTDROP_LAYERS})
            layers = [layer for layer in layers if layer >= 0]
        if not layers or layers[-1] > num_layers - 2:
            raise MethodOptionError(
                f"mustdrop_llm filters after layers {list(layers)}, but a {num_layers}-layer decoder needs a layer "
                f"after each; pass layers= (mustdrop: prefill_layers=) with values in [0, {num_layers - 2}]."
                if num_layers >= 2 else
                f"mustdrop_llm needs a decoder of at least 2 layers (this one has {num_layers}); run mustdrop's "
                "window merge alone with prefill=False.")
        return list(layers)

    def pruning_layers(self, num_layers: int) -> list[int]:
        return [layer + 1 for layer in self.filter_layers(num_layers)]

    def cache_cut_from(self, num_layers: int) -> int | None:
        return self.filter_layers(num_layers)[0] if self.config["cut_cache"] else None

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        return [(layer, num_visual) for layer in self.pruning_layers(num_layers)]  # upper bounds (adaptive)

    def schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        return self.plan_schedule(num_layers, num_visual, num_images)  # nothing to warn about before the data

    def prepare(self, inputs_embeds, real, visual, text, source, vision=None) -> list[_MustDropState]:
        name = self.vision_signals[0]
        states = []
        for b in range(inputs_embeds.shape[0]):
            scores = vision[b][name]  # [n_b] over the sample's real columns, NaN off the unmerged visual tokens
            count = int(visual[b].sum())
            candidates = torch.nonzero(~torch.isnan(scores)).flatten()
            chosen = topk_select(scores[candidates], min(candidates.numel(), key_set_count(count, self.config["key_ratio"])))
            states.append(_MustDropState(key=source[b][candidates[chosen]]))
        return states

    def _budget_ratio(self, layers: list[int], num_layers: int, fraction: float) -> float:
        """The kept fraction per filter whose layer average (all tokens before the first pruning layer, then
        fraction^(i + 1) after filter i) equals ``fraction`` of the visual tokens."""
        if fraction >= 1.0:
            return 1.0
        if geometric_layer_average(0.0, layers, num_layers, 1) > fraction:
            raise BudgetError(f"mustdrop_llm processes every visual token in its first {layers[0]} of {num_layers} "
                              f"decoder layers, so it cannot average {fraction:.3f} of them; raise the budget or "
                              "pass earlier layers=.")
        return geometric_ratio(fraction, layers, num_layers, 1)

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        batch = ctx.hidden.shape[0]
        queries, visuals = [], []
        for b in range(batch):
            visual = torch.nonzero(ctx.visual[b]).flatten()
            text = torch.nonzero(ctx.text[b] & ctx.real[b]).flatten()
            after = text[text > visual[-1]] if visual.numel() else text[:0]
            visuals.append(visual)
            queries.append(after)
        todo = [b for b in range(batch) if wanted[b] is not None and queries[b].numel() and visuals[b].numel()]
        out: list[LayerSelection | None] = [None] * batch
        if not todo:
            return out
        width = max(queries[b].numel() for b in todo)
        index = torch.stack([torch.cat([q, q[-1:].expand(width - q.numel())]) if q.numel() else
                             torch.zeros(width, dtype=torch.long, device=ctx.hidden.device) for q in queries])
        rows = attention_rows(ctx.layers[ctx.layer - 1], ctx.previous_hidden, ctx.previous_position_embeddings,
                              index, key_padding_mask=ctx.real, average_heads=True)  # [B, Q, L]
        c = self.config
        for b in todo:
            state: _MustDropState = ctx.prepared[b]
            visual = visuals[b]
            images = max(ctx.images[b] if ctx.images else 1, 1)
            if state.stage == 0 and self.image_budget is not None and self.image_budget * images >= visual.numel():
                state.stage = -1  # the budget covers every visual token of this sample: nothing is pruned
            if state.stage < 0:
                continue
            attention = rows[b, :queries[b].numel()][:, visual]  # [T, V]
            local = torch.searchsorted(torch.nonzero(ctx.real[b]).flatten(), visual).cpu()  # real-column index
            positions = ctx.source[b][local]
            merged = ctx.merged[b][local] if ctx.merged is not None else torch.zeros_like(positions, dtype=torch.bool)
            key = (torch.isin(positions, state.key.cpu()) & ~merged).to(visual.device)
            if self.budget is None:
                keep = dual_attention_keep(attention, c["global_thr"], c["individual_thr"]) | key
            else:
                keep = self._budget_keep(ctx, b, state, attention, key)
            state.stage += 1
            if bool(keep.all()):
                continue
            out[b] = LayerSelection(keep=visual[keep])
        return out

    def _budget_keep(self, ctx: LayerContext, b: int, state: _MustDropState, attention: torch.Tensor,
                     key: torch.Tensor) -> torch.Tensor:
        count = attention.shape[1]
        num_layers = len(ctx.layers)
        if state.ratio is None:
            state.entering = count
            images = ctx.images[b] if ctx.images else 1
            fraction = self._target_equivalent(count, images) / count
            state.ratio = self._budget_ratio(self.pruning_layers(num_layers), num_layers, fraction)
        target = round(state.entering * state.ratio ** (state.stage + 1))
        if target >= count:
            return torch.ones(count, dtype=torch.bool, device=attention.device)
        total = attention.float().sum(dim=0)  # [V]
        share = total / total.sum()
        largest = attention.float().max(dim=0).values
        c = self.config
        inf = torch.full_like(share, float("inf"))
        rank = torch.maximum(share / c["global_thr"] if c["global_thr"] > 0 else inf,
                             largest / c["individual_thr"] if c["individual_thr"] > 0 else inf)
        rank = torch.where(key, inf, rank)  # the key set first
        order = torch.sort(rank, descending=True, stable=True).indices[:max(target, int(key.sum()))]
        keep = torch.zeros(count, dtype=torch.bool, device=attention.device)
        keep[order] = True
        return keep
