"""Pre-LLM methods: choose visual tokens after the projector, before decoder layer 0.

Each class is registry glue only: it reads the signals the engine captured for a :class:`VisualGroup`
and calls a pure function of ``vtprune.selectors``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BudgetError, MethodOptionError
from ..registry import Method, Selection, VideoClip, VisualGroup, register_method
from ..selectors.baselines import pool_grid, random_select, uniform_frames, uniform_grid_select
from ..selectors.cls_attention import topk_select
from ..selectors.divprune import divprune_select
from ..selectors.visionzip import split_visionzip_budget, visionzip_select


def _all_kept(group: VisualGroup) -> Selection:
    return Selection(keep=torch.arange(group.num_tokens, device=group.features.device))


def _require_grid(method: str, group: VisualGroup) -> tuple[int, int]:
    if group.height is None or group.width is None or group.height * group.width != group.num_tokens:
        raise MethodOptionError(f"{method!r} needs a rectangular patch grid, but this group is not one.")
    return group.height, group.width


@register_method
class RandomPrune(Method):
    """Random subset of the visual tokens (seeded) — a strong baseline that every table should report.

    Default budget 64 tokens per image; ``seed=0``. Video: per frame (each frame its own seeded subset of an
    even share of the clip's budget), the usual random-pruning baseline of the video papers.
    """

    name = "random"
    paper = "baseline"
    budget_policy = "per_crop"

    def select(self, group: VisualGroup, k: int) -> Selection:
        keep = random_select(group.num_tokens, k, seed=group.seed).to(group.features.device)
        return Selection(keep=keep)


@register_method
class UniformGrid(Method):
    """Uniform spatial sub-grid of the patch grid (exactly ``k`` tokens spread evenly). Baseline; default 64.

    Video: the same sub-grid in every frame (per frame, an even share of the clip's budget; spatial
    downsampling of each frame)."""

    name = "uniform"
    paper = "baseline"
    signals = ("grid",)

    def select(self, group: VisualGroup, k: int) -> Selection:
        h, w = _require_grid(self.name, group)
        return Selection(keep=uniform_grid_select(h, w, k).to(group.features.device))


@register_method
class AveragePool(Method):
    """Average pooling of the projected patch grid down to at most ``k`` tokens (adaptive windows).

    Baseline (the "downsample" family: LLaVA-OneVision / LLaVA-Video pool projected features 2×2). Each pooled
    token takes the position of its window's top-left patch; default positions ``compact`` (as if the image
    had been smaller: on Qwen's M-RoPE exactly the rope index of an image with the pooled grid). The window
    means are returned as merge weights, so Qwen3-VL's deepstack features are pooled the same way. Default 64
    tokens per image. Video: every frame pooled to its even share of the clip's budget (what LLaVA-Video's
    per-frame pooling does, to a smaller grid).
    """

    name = "pool"
    paper = "baseline"
    signals = ("grid",)
    default_positions = "compact"
    exact_count = False  # the pooled grid holds at most k tokens

    def select(self, group: VisualGroup, k: int) -> Selection:
        h, w = _require_grid(self.name, group)
        pooled = pool_grid(group.features, h, w, k)
        empty = torch.empty(0, dtype=torch.long, device=group.features.device)
        window = F.one_hot(pooled.assignment, pooled.tokens.shape[0]).T.float()  # [m, N]
        weights = window / window.sum(dim=1, keepdim=True)  # window means
        return Selection(keep=empty, merged=pooled.tokens, anchors=pooled.anchors.to(group.features.device),
                         weights=weights)


@register_method
class UniformFrames(Method):
    """Uniform frame sampling — keep every token of evenly spaced frames, as many whole frames as the budget
    holds. Baseline for video (the reference temporal methods are compared against): it is what feeding the
    model fewer frames does, without re-running the encoder.

    Video (``video_policy="clip"``): with N tokens per frame and a budget of k tokens, m = k // N frames are
    kept whole, at ``linspace(0, T - 1, m)`` truncated to ints (the uniform sampling of LLaVA-Video and
    lmms-eval); the k − m·N tokens left over are not spent (the count is at most the budget). A budget below one
    frame keeps the middle frame's uniform spatial sub-grid of k tokens (the ``uniform`` baseline on that
    frame), so every budget is honoured. Positions ``compact`` by default (as if the shorter clip had been the
    input; on Qwen's M-RoPE a dropped temporal group leaves its time gap, since temporal ids keep their offsets).
    Qwen3-VL's timestamp text of a dropped frame stays (text is never pruned). Unlike sampling fewer frames
    before the encoder, the vision tower still runs on every frame. Images (one frame): the ``uniform``
    sub-grid. Default budget 0.25 of the clip.
    """

    name = "frames"
    paper = "baseline"
    signals = ("grid",)
    default_budget = 0.25
    default_positions = "compact"
    video_policy = "clip"
    exact_count = False  # whole frames: at most the budget

    def select(self, group: VisualGroup, k: int) -> Selection:
        h, w = _require_grid(self.name, group)
        return Selection(keep=uniform_grid_select(h, w, k).to(group.features.device))

    def select_clip(self, clip: VideoClip, k: int) -> Selection:
        per_frame, device = clip.tokens_per_frame, clip.features.device
        whole = min(k // per_frame, clip.frames)
        if whole == 0:  # less than one frame: a uniform sub-grid of the middle frame
            middle = clip.frames // 2
            spatial = uniform_grid_select(clip.height, clip.width, k)
            return Selection(keep=(middle * per_frame + spatial).to(device))
        frames = uniform_frames(clip.frames, whole)  # [m], ascending
        keep = (frames[:, None] * per_frame + torch.arange(per_frame)[None, :]).reshape(-1)  # [m * N]
        return Selection(keep=keep.to(device))


@register_method
class FasterVLM(Method):
    """FasterVLM — keep the top-k patches by [CLS] attention (Zhang et al., arXiv 2412.01818; official code
    Theia-4869/FasterVLM @ f5d5f12, ``llava/model/llava_arch.py`` ``encode_images`` and
    ``prepare_inputs_labels_for_multimodal``, ``llava/model/multimodal_encoder/clip_encoder.py``).

    Score = attention of the ViT's [CLS] query to each patch at the layer whose hidden states feed the projector
    (LLaVA: the penultimate layer, ``attentions[-2]`` in the official code), averaged over heads; computed from
    that layer's q/k for the CLS row only (the vision tower stays on SDPA). Top-k (ties: lower index), kept
    tokens in raster order. Positions ``compact`` by default, as in the official code (the pruned features are
    spliced into the sequence, which is then numbered 0..L-1); ``positions="original"`` keeps each token's
    position. Paper budgets: 75/90/95 % reduction (144/58/29 of 576); default 64.

    LLaVA-NeXT: as in the official code, the base image and every crop keep the **same number** of tokens
    (``budget_policy="equal_per_crop"``: the budget divided equally, the remainder to the earliest groups; the
    official ``visual_token_num`` is that per-crop k, e.g. 29 per crop = 145 for 5 crops). Deviations the HF
    class imposes: the official code forces ``mm_patch_merge_type='spatial'`` — it neither unpads the crops nor
    inserts row newlines — and ranks each crop's 576 patches; ``LlavaNextForConditionalGeneration`` unpads, so
    the padding patches are not in the sequence: vtprune ranks the crop's unpadded patches (a crop with fewer
    patches than its share keeps them all and the rest is shared over the other crops). Row newlines stay as
    everywhere in vtprune (kept while their row holds a token). LLaVA-OneVision (no official code) keeps the
    proportional split of the base view and its high-resolution grid (several crops packed into one group).

    Encoders without a [CLS] token (LLaVA-OneVision's SigLIP, the Qwen-VL ViTs; no official code): the score is
    the mean attention each patch *receives* at the feature layer — mean over heads and over every query of its
    crop / image — computed from that layer's q/k (after the vision rotary embedding on Qwen), again without
    eager attention. Qwen-VL: one LLM token is a 2×2 PatchMerger group, so its score is the mean of its 4
    patches' scores; Qwen2.5-VL's windowed block order (``window_index``) is undone first. LLaVA-OneVision:
    scores are packed like the features (a downsampled AnyRes grid gets the interpolated scores of its tokens).
    Video (no official code): per frame, top-k of that frame's scores for an even share of the clip's budget
    (scores from the ViT run on the video: Qwen attends within each temporal group; OneVision frames are scored
    like base views and the scores pooled 2x2 like the features).
    """

    name = "fastervlm"
    paper = "arXiv:2412.01818"
    signals = ("cls_attention",)
    budget_policy = "equal_per_crop"
    default_positions = "compact"

    def select(self, group: VisualGroup, k: int) -> Selection:
        return Selection(keep=topk_select(group.signals["cls_attention"], k))


@register_method
class VisionZip(Method):
    """VisionZip — dominant tokens by [CLS] attention + contextual tokens merged by key similarity
    (Yang et al., CVPR 2025, arXiv 2412.04467; official code dvlab-research/VisionZip @ 3151f6d,
    ``visionzip/clip_encoder.py`` L43-85, ``visionzip/utils.py`` L10-90 and L186-197, ``visionzip/main.py``,
    ``visionzip/llava_arch.py``).

    Counts: ``dominant`` + ``contextual`` tokens per image; default split 54:10 of each 64 (``dominant``/
    ``contextual`` override it). LLaVA-NeXT: as in the official code, the base image and every crop get the
    same count (``budget_policy="equal_per_crop"``, see ``fastervlm``), split 54:10 in each. On CLIP encoders
    (LLaVA-1.5, LLaVA-NeXT) the official default is kept (``keep_cls=None``): ``dominant`` counts the [CLS]
    token, as ``visionzip(model, dominant=54)``
    does (it passes ``dominant - 1`` to the tower): the CLS state of the feature layer plus the top
    ``dominant - 1`` patches by CLS attention (summed over heads — the same ranking as vtprune's mean) are the
    dominant tokens, and the CLS state is projected like any visual token and fed to the LLM. It has no
    placeholder in the HF sequence, so it is an extra token (counted in ``stats().stages[0].merged`` with the
    contextual tokens; ``kept_positions`` lists the dominant patches); the image still costs exactly
    ``dominant + contextual`` tokens. ``keep_cls=False`` is the CLS-free variant: ``dominant`` patches, no CLS
    (what encoders without a [CLS] token always do); ``keep_cls=True`` refuses encoders without one.

    Contextual: the tokens that are neither CLS nor dominant, in raster order, give ``contextual`` targets by a
    uniform stride (``step = max(1, R // contextual)``); every other one is merged into its most cosine-similar
    target by the head-averaged ViT keys of the feature layer; contextual token = target hidden state + mean of
    the hidden states merged into it, in ViT space (the projector's input), then projected.

    Placement and positions, official by default (``positions="compact"``: the official sequence is numbered
    0..L-1): LLaVA-1.5 — [CLS, dominant patches in raster order, contextual tokens in target order] at the
    image's place; LLaVA-NeXT — the base image as LLaVA-1.5, then the crops' dominant patches, then every
    crop's CLS, then every crop's contextual tokens (``llava_arch.restore_image_features_sorted``), all placed
    after the image's last token. Under ``positions="original"`` every extra token stands at the position of
    the token it comes from instead (CLS: the first patch of its crop, before it; a contextual token: its
    target). Deviations the HF class imposes on LLaVA-NeXT: the official code neither unpads the crops nor
    inserts row newlines (the newline it builds is unused), and ranks each crop's 576 patches; vtprune works on
    the unpadded crops and keeps a row's newline while the row holds a token.

    Encoders without a [CLS] token (LLaVA-OneVision's SigLIP, the Qwen-VL ViTs; no official code; selection
    as before the official CLS default, positions now ``compact`` like every family): no CLS token; dominant
    tokens are ranked by the mean attention each token receives at the
    feature layer (see ``fastervlm``); contextual tokens stand right after their target. Qwen-VL: per 2×2
    PatchMerger group the score and the head-averaged keys (taken before the vision rotary embedding, so
    similarity is by content) are averaged over the group's 4 patches, after undoing Qwen2.5-VL's window
    order; the hidden state merged is the merger's input (the 4 patch states concatenated) and contextual
    tokens are projected by the PatchMerger. The merge is returned as weights (target 1, assigned tokens
    1/count), which Qwen3-VL's deepstack features follow.

    Video: per frame, dominant + contextual tokens from an even share of the clip's budget (split 54:10), as the
    video port of VisionZip in cokeshao/HoliTom (``visionzip/``) selects per frame on LLaVA-OneVision /
    LLaVA-Video; the scores are the mean received attention of the frame's tokens.
    """

    name = "visionzip"
    paper = "arXiv:2412.04467"
    signals = ("cls_attention", "vit_keys", "vit_hidden")
    optional_signals = ("vit_cls_hidden",)
    options = {"dominant": None, "contextual": None, "keep_cls": None}
    budget_policy = "equal_per_crop"
    default_positions = "compact"

    def __init__(self, budget=None, positions=None, seed: int = 0, **options):
        dominant, contextual = options.get("dominant"), options.get("contextual")
        if budget is None and isinstance(dominant, int) and isinstance(contextual, int):
            budget = dominant + contextual or None  # the two counts are the budget (0 + 0 is refused below)
            self._budget_from_options = True
        super().__init__(budget=budget, positions=positions, seed=seed, **options)

    def validate_options(self) -> None:
        for key in ("dominant", "contextual"):
            value = self.config[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise MethodOptionError(f"visionzip option {key}={value!r} must be a non-negative int.")
        if self.config["keep_cls"] not in (None, True, False):
            raise MethodOptionError(f"visionzip option keep_cls={self.config['keep_cls']!r} must be True, False or "
                                    "None (keep the [CLS] token where the encoder has one, as the official code).")
        dominant, contextual = self.config["dominant"], self.config["contextual"]
        if dominant == 0 and contextual == 0:
            raise MethodOptionError("visionzip dominant=0, contextual=0 keeps no visual token; give at least one "
                                    "token (paper: dominant=54, contextual=10 for 64).")
        requested = (dominant or 0) + (contextual or 0)
        if isinstance(self.budget, int) and requested > self.budget:
            raise MethodOptionError(
                f"visionzip dominant={dominant} + contextual={contextual} = {requested} tokens exceed budget="
                f"{self.budget} (tokens per image); lower them, raise the budget, or give only the budget (split "
                "54:10)."
            )

    def budget_overrides(self) -> list[str]:
        dominant, contextual = self.config["dominant"], self.config["contextual"]
        if dominant is None or contextual is None or getattr(self, "_budget_from_options", False):
            return []
        if isinstance(self.budget, int) and dominant + contextual == self.budget:
            return []
        return ["dominant", "contextual"]

    def check_image_tokens(self, num_tokens: int) -> int:
        kept = super().check_image_tokens(num_tokens)
        if kept >= num_tokens:
            return num_tokens
        return sum(self._counts(kept, num_tokens))  # dominant + contextual must fit: refused here, at apply()

    def _counts(self, k: int, size: int) -> tuple[int, int]:
        """(dominant, contextual) for a group of ``size`` tokens with ``k`` kept tokens (its share of the
        budget); options that do not fit the share are refused here, before the decoder runs."""
        dominant, contextual = self.config["dominant"], self.config["contextual"]
        if dominant is None and contextual is None:
            return split_visionzip_budget(k)
        if dominant is None:
            dominant = max(k - contextual, 0)
        elif contextual is None:
            contextual = max(k - dominant, 0)
        if dominant + contextual > k:
            raise BudgetError(
                f"visionzip dominant={dominant} + contextual={contextual} = {dominant + contextual} tokens do not "
                f"fit the {k} tokens this crop/image of {size} tokens gets from budget={self.budget!r} (per-crop "
                "budgets: LLaVA-NeXT splits the budget over the base image and every crop); lower dominant and "
                "contextual, raise the budget, or give only the budget (split 54:10 per crop)."
            )
        return dominant, contextual

    def select(self, group: VisualGroup, k: int) -> Selection:
        dominant, contextual = self._counts(k, group.num_tokens)
        if dominant + contextual >= group.num_tokens:
            return _all_kept(group)
        s = group.signals
        cls_state = s.get("vit_cls_hidden")
        if self.config["keep_cls"] and cls_state is None:
            raise MethodOptionError("visionzip keep_cls=True needs a vision encoder with a [CLS] token (CLIP, under "
                                    "the 'default' feature strategy); this model has none: drop keep_cls.")
        with_cls = cls_state is not None and self.config["keep_cls"] is not False and dominant >= 1
        patches = dominant - 1 if with_cls else dominant
        result = visionzip_select(s["vit_hidden"], s["vit_keys"], s["cls_attention"], patches, contextual)
        if not with_cls:
            if not result.merged.shape[0]:
                return Selection(keep=result.keep)
            return Selection(keep=result.keep, merged=group.project(result.merged), anchors=result.anchors,
                             weights=_visionzip_weights(result.assignment, result.anchors))
        return self._with_cls(group, result, cls_state[0])

    def _with_cls(self, group: VisualGroup, result, cls_state: torch.Tensor) -> Selection:
        """The official token set: [CLS] + dominant patches + contextual tokens, placed as the official code
        places them (see the class docstring)."""
        device = group.features.device
        merged = group.project(torch.cat([cls_state[None].to(result.merged.dtype), result.merged]))
        num_ctx = result.anchors.numel()
        last = group.num_tokens - 1
        if self.positions == "original":  # each extra token at the position of the token it comes from
            anchors = torch.cat([torch.zeros(1, dtype=torch.long, device=device), result.anchors.to(device)])
            order = torch.tensor([-1] + [1] * num_ctx, device=device)
            return Selection(keep=result.keep, merged=merged, anchors=anchors, order=order)
        if group.index == 0:  # base image / LLaVA-1.5: [CLS] first, contextual tokens after the image's patches
            anchors = torch.tensor([0] + [last] * num_ctx, dtype=torch.long, device=device)
            order = torch.tensor([-1] + [1] * num_ctx, device=device)
            return Selection(keep=result.keep, merged=merged, anchors=anchors, order=order)
        # LLaVA-NeXT crop: after the whole crop grid, every crop's CLS (order 1), then every crop's contextual
        # tokens (order 2)
        anchors = torch.full((1 + num_ctx,), last, dtype=torch.long, device=device)
        order = torch.tensor([1] + [2] * num_ctx, device=device)
        return Selection(keep=result.keep, merged=merged, anchors=anchors, order=order,
                         at_end=torch.ones(1 + num_ctx, dtype=torch.bool, device=device))


def _visionzip_weights(assignment: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[C, N] weights of VisionZip's contextual tokens: 1 on the target, 1/count on each token merged into it."""
    num_ctx, n = anchors.numel(), assignment.numel()
    weights = torch.zeros(num_ctx, n, dtype=torch.float32, device=assignment.device)
    merged_in = assignment >= 0
    merged_in[anchors] = False  # targets carry weight 1 (below), the tokens assigned to them the mean
    members = torch.nonzero(merged_in).flatten()
    counts = torch.bincount(assignment[members], minlength=num_ctx).clamp_min(1).float()
    weights[assignment[members], members] = 1.0 / counts[assignment[members]]
    weights[torch.arange(num_ctx, device=assignment.device), anchors] = 1.0
    return weights


@register_method
class DivPrune(Method):
    """DivPrune — Max-Min diversity selection on the projected visual tokens (Alvar et al., CVPR 2025,
    arXiv 2503.02175).

    Official code: vbdi/divprune @ 799e2d9, ``LLaVA/llava/model/llava_arch.py`` L147-171 (``DivPrune``) and
    L352-385 (applied to the LLM input embeddings of the image, before decoder layer 0).

    Distance = 1 − cosine similarity of the LLM input embeddings; greedy max-min with a running minimum
    (O(N·k) after the distance matrix; the official recomputes the minimum over the selected rows each step,
    same picks). Kept tokens in original order. Budget is global over the image (base and crops together), as
    in the official code; the official code re-indexes positions (``compact``), which is the default here too.
    Default 64 tokens per image (the official takes a ratio, ``SUBSET_RATIO``: ``budget=0.1`` is its 10 %).
    Documented differences: the official runs in fp16, so near-ties can fall differently from vtprune's
    float32 distances (identical on identical fp32 inputs); vtprune clamps distances to [0, 2] with a zero
    diagonal, which only matters for exact duplicates (the official may then re-pick a token). On LLaVA-NeXT
    the official candidates include the row-newline tokens (it selects over the whole packed image); vtprune
    treats newlines as layout (kept while their row holds a token) and selects among content tokens only.
    Video: one selection over all the clip's tokens (``video_policy="global"``): max-min diversity is a property of
    the whole set, so near-duplicate tokens of consecutive frames compete with each other instead of each frame
    keeping its own share.
    """

    name = "divprune"
    paper = "arXiv:2503.02175"
    budget_policy = "global"
    video_policy = "global"
    default_positions = "compact"

    def select(self, group: VisualGroup, k: int) -> Selection:
        return Selection(keep=divprune_select(group.features, k))
