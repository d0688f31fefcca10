"""In-ViT methods: reduce the tokens between the blocks of the vision encoder (``vtprune/engine/vit_stage.py``).

Each class is registry glue: it turns the budget into a per-layer plan and calls the pure cores of
``vtprune.selectors.tome`` / ``vtprune.selectors.flowcut`` on the q/k/v the engine computed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..budget import tokens_for
from ..engine.attention_rows import query_key_value
from ..errors import BudgetError, MethodOptionError
from ..registry import IN_VIT, Method, VisionTower, register_method
from ..selectors.flowcut import (
    adaptive_prune_count,
    flowcut_keep,
    flowcut_layer_signals,
    flowcut_llm_scores,
    flowcut_score,
)
from ..selectors.tome import MergePlan, bipartite_soft_matching, parse_r, schedule_for_target
from .in_llm import LayerContext, LayerMethod, _single_layer, _single_stage_schedule, _validate_layer_ratio


class InVitMethod(Method):
    """Base of the in-ViT methods. The engine calls, per image (its rows of the tower batch) and per block:
    ``vit_start(cohort)`` once, ``vit_merge`` after the block's attention (a :class:`MergePlan` or None) and
    ``vit_prune`` after its MLP (indices of the tokens kept, in their new order, or None)."""

    stage = IN_VIT
    default_positions = "compact"
    #: add log(size) of the keys to the attention logits (ToMe's proportional attention)
    proportional_attention: ClassVar[bool] = False
    #: the method scores tokens with the encoder's [CLS] token
    needs_class_token: ClassVar[bool] = False

    def lowest_tokens(self, adapter) -> int:
        """The fewest visual tokens per vision input this method can leave on ``adapter``'s tower."""
        if self.needs_class_token and not adapter.vit_has_class_token():
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"{self.name!r} needs a [CLS] token")
        return 1

    def row_budget(self, rows: int, visual_per_row: int) -> int:
        """Visual tokens each of an image's ``rows`` vision inputs (LLaVA-NeXT: base view and crops) keeps after
        the feature layer: an int budget split evenly over them, a float that fraction of each."""
        if isinstance(self.budget, int):
            return max(1, self.budget // rows)
        return tokens_for(self.budget, visual_per_row)

    def vit_start(self, cohort) -> None:
        """Plan the image's pruning (``cohort.target`` tokens per row after the feature layer)."""

    def vit_merge(self, cohort, inputs) -> MergePlan | None:
        return None

    def vit_prune(self, cohort, inputs) -> torch.Tensor | None:
        return None


@register_method
class ToMe(InVitMethod):
    """ToMe — Token Merging inside every vision-encoder block (Bolya et al., ICLR 2023, arXiv 2210.09461;
    official code facebookresearch/ToMe @ af95e4b, ``tome/merge.py`` L18-97 and L210-224, ``tome/patch/timm.py``
    L21-96, ``tome/utils.py`` L80-105; VLM port: ModelTC/LightCompress ``token_reduction/tome.py``).

    In each block, between attention and MLP: the tokens alternate into sets A and B, each A token is matched to
    its most similar B token by the cosine of the block's keys averaged over heads, and the ``r`` best-matched A
    tokens are merged into their match by a size-weighted average; the [CLS] token is never merged; sizes are
    tracked over blocks and, with ``prop_attn=True`` (the official default for off-the-shelf models), log(size)
    of every key is added to the attention logits (an additive float mask given to SDPA; no eager attention).
    The token order is the official one ([CLS], unmerged A, then B), which decides the next block's A/B split.

    Budget: tokens per image reaching the LLM (int; LLaVA-NeXT / OneVision: split evenly over the image's base view
    and crops, each of which is merged on its own) or a fraction of each input's patches. The per-block ``r`` is
    derived from it: every block up to the feature layer merges an even share of what is left (capped at half
    the tokens, as official). ``r`` (int, ``(r, inflection)`` or a list, the official ``parse_r`` forms over all
    encoder blocks) overrides the budget. A merged token takes the position (and placeholder) of the B token the
    others were merged into; default positions ``compact`` (the LLM gets contiguous positions, as in LLaVA).

    Deviations: the official code patches timm ViTs (and LightCompress, LLaVA's CLIP without proportional
    attention or size propagation); vtprune runs the official algorithm on HF CLIP/SigLIP towers with sizes and
    proportional attention. Blocks after the feature layer (LLaVA's last CLIP block, unused by the LLM) run on
    the merged tokens without merging. SigLIP has no [CLS]: nothing is protected there.
    """

    name = "tome"
    paper = "arXiv:2210.09461"
    options = {"r": None, "prop_attn": True}
    default_budget = 64

    @property
    def proportional_attention(self) -> bool:  # type: ignore[override]
        return bool(self.config["prop_attn"])

    def validate_options(self) -> None:
        r = self.config["r"]
        ok = r is None or (isinstance(r, int) and not isinstance(r, bool) and r >= 0) or (
            isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) and -1 <= float(r[1]) <= 1) or (
            isinstance(r, list) and all(isinstance(v, int) and v >= 0 for v in r))
        if not ok:
            raise MethodOptionError(f"tome option r={r!r} must be a non-negative int, an (r, inflection) tuple with "
                                    "inflection in [-1, 1], or a list of ints (tokens merged per block).")
        if not isinstance(self.config["prop_attn"], bool):
            raise MethodOptionError(f"tome option prop_attn={self.config['prop_attn']!r} must be True or False.")

    def budget_overrides(self) -> list[str]:
        return ["r"] if self.config["r"] is not None else []

    def lowest_tokens(self, adapter) -> int:
        vc = adapter.config.vision_config
        tokens = (vc.image_size // vc.patch_size) ** 2 + (1 if adapter.vit_has_class_token() else 0)
        protected = 1 if adapter.vit_has_class_token() else 0
        for _ in range(adapter.vit_feature_index() + 1):  # every block merging half of its tokens
            tokens -= max(0, (tokens - protected) // 2)
        return max(1, tokens - (1 if adapter.config.vision_feature_select_strategy == "default" else 0))

    def vit_start(self, cohort) -> None:
        layers = cohort.feature_index + 1
        r = self.config["r"]
        if r is not None:
            schedule = parse_r(cohort.num_layers, r)[:layers]
            cohort.state["forced"] = any(schedule)
        else:
            protected = 1 if cohort.class_token else 0
            try:
                schedule = schedule_for_target(cohort.num_tokens, cohort.target, layers, protected)
            except ValueError as error:
                raise BudgetError(f"tome: budget={self.budget!r} is unreachable: {error}; raise the budget.") from None
        cohort.state["schedule"] = schedule

    def vit_merge(self, cohort, inputs) -> MergePlan | None:
        schedule = cohort.state["schedule"]
        r = schedule[inputs.index] if inputs.index < len(schedule) else 0
        if r <= 0:
            return None
        metric = inputs.k.mean(1)  # [R, t, dh]: keys averaged over heads
        return bipartite_soft_matching(metric, r, cohort.class_token)


@register_method
class FlowCut(InVitMethod):
    """FlowCut — progressive pruning inside the vision encoder by information flow (Tong et al., NeurIPS 2025,
    arXiv 2505.19536; official code TungChintao/FlowCut @ a2ecd24, ``flowcut/modeling_clip_flowcut.py`` L14-172,
    ``flowcut/utils_flowcut.py``, ``flowcut/main.py``).

    After each block up to the feature layer (CLIP's penultimate for LLaVA), while more than the target remain:
    score = (CLS-attention share + CLS-value "semantic" attention share) × ‖head-mean value‖₁ per patch, from
    the block's q/k/v (CLS row only; the block runs on SDPA); cumulative score = ½ previous + ½ current. With
    ``rpl`` = blocks left before the feature layer, on even ``rpl`` the block prunes
    r = round((n − target) / √rpl × (1 − H²)) patches (H = entropy of the CLS attention / log n; the maximum over
    the image's rows, as the official maximum over its batch of one image's crops), keeping at least the target
    by top cumulative score in original order; at ``rpl = 0`` it prunes to the target. The [CLS] token is kept.

    Budget: tokens per image reaching the LLM (int; LLaVA-NeXT: split evenly over the base view and crops, each
    pruned on its own) or a fraction of each input's patches. Positions ``compact`` (LLaVA: contiguous).

    AnyRes (LLaVA-NeXT), as the official ``flowcut()`` for ``image_aspect_ratio == 'anyres'``: with an int budget
    ``k`` the base view and every crop each keep ``k // 2`` patches in the ViT, and the decoder stage
    :class:`FlowCutLLM` (``flowcut_llm``, installed with it) keeps ``k`` visual tokens per image from decoder
    layer 2 on, scored in layer 1. ``llm``: None (default) = that stage on LLaVA-NeXT with an int budget, off
    otherwise (the split above does not apply then); False = off (each crop keeps its even share of ``k`` in the
    ViT, the behaviour before it existed); True = on for any model (an int budget is needed: the official
    ``target_num`` is a count).

    Deviations: The official code computes the
    scores in the model's dtype (fp16); vtprune in float32. Encoders without a [CLS] token (SigLIP,
    LLaVA-OneVision) are refused: FlowCut's scores are defined by the CLS query and value. Qwen's ViT is refused
    by the engine (see ``vtprune/engine/vit_stage.py``).
    """

    name = "flowcut"
    paper = "arXiv:2505.19536"
    options: ClassVar[dict[str, Any]] = {"llm": None}
    default_budget = 64
    needs_class_token = True
    solo = {"llm": False}

    def __init__(self, budget=None, positions: str | None = None, seed: int = 0, **options: Any):
        super().__init__(budget=budget, positions=positions, seed=seed, **options)
        self._llm = False

    def validate_options(self) -> None:
        llm = self.config["llm"]
        if llm not in (None, True, False):
            raise MethodOptionError(f"flowcut option llm={llm!r} must be None (on for LLaVA-NeXT's AnyRes inputs with "
                                    "an int budget), True or False.")
        if llm is True and not isinstance(self.budget, int):
            raise MethodOptionError(f"flowcut llm=True keeps the budget's count of visual tokens in the decoder (the "
                                    f"official target_num), so it needs an int budget, got {self.budget!r}.")

    def bind(self, tower: VisionTower) -> None:
        llm = self.config["llm"]
        self._llm = (tower.family == "llava_next" and isinstance(self.budget, int)) if llm is None else llm

    def companions(self) -> list[Method]:
        return [FlowCutLLM(target=self.budget, positions=self.positions)] if self._llm else []

    def row_budget(self, rows: int, visual_per_row: int) -> int:
        if self._llm:  # official anyres: int(target_num / 2) patches in each crop (and the base view)
            return max(1, self.budget // 2)
        return super().row_budget(rows, visual_per_row)

    def vit_start(self, cohort) -> None:
        cohort.state["cumulative"] = None

    def vit_prune(self, cohort, inputs) -> torch.Tensor | None:
        t = cohort.num_tokens
        if t <= cohort.target:
            return None
        rpl = cohort.feature_index - inputs.index - 1
        cls_attention, semantic, value = flowcut_layer_signals(inputs.q, inputs.k, inputs.v, inputs.scale)
        scores = flowcut_score(cls_attention, semantic, value)  # [R, t-1]
        previous = cohort.state["cumulative"]
        cumulative = scores if previous is None else 0.5 * previous + 0.5 * scores
        cohort.state["cumulative"] = cumulative
        if rpl < 0 or rpl % 2:
            return None
        prune = adaptive_prune_count(cls_attention, rpl, cohort.target - 1) if rpl else t
        keep_total = max(t - prune, cohort.target)
        patches = flowcut_keep(cumulative, keep_total - 1)  # [R, keep_total - 1] patch indices, ascending
        cohort.state["cumulative"] = cumulative.gather(1, patches)
        cls = torch.zeros(patches.shape[0], 1, dtype=patches.dtype, device=patches.device)
        return torch.cat([cls, patches + 1], dim=1)



@register_method
class FlowCutLLM(LayerMethod):
    """FlowCut's decoder stage for AnyRes inputs (Tong et al., NeurIPS 2025, arXiv 2505.19536; official code
    TungChintao/FlowCut @ a2ecd24, ``flowcut/main.py`` L23-61 (``prune_layer = 1``, ``target_num``),
    ``flowcut/modeling_llama_flowcut.py`` L246-290 (scores) and L492-575 (the drop), ``flowcut/utils_flowcut.py``
    ``compute_score``). ``flowcut`` installs it on LLaVA-NeXT with an int budget; it also runs on its own.

    In decoder layer ``layer − 1`` (official ``prune_layer = 1``; default ``layer=2``, the first layer that sees
    the pruned sequence) the last prompt token's query and value are compared with the visual tokens' keys and
    values: relation = softmax(q·k/√dh) and semantic = softmax(v·v/√dh), each over the visual tokens only,
    averaged over heads (recomputed from that layer's q/k/v; the model stays on SDPA); score = (relation share +
    semantic share) × ‖head-mean value‖₁, the same rule as FlowCut's ViT stage. The top ``target`` visual tokens
    per image (the official ``target_num``) are kept for the later layers, in order. ``target`` overrides the
    budget and ``ratio`` (the dropped fraction, as FastV); without either an int / float budget is the layer
    average of visual tokens, as FastV. Positions ``compact`` (official: the kept sequence renumbered, decoding
    shifted by the dropped count).

    Deviations: scores in float32 (official: the model dtype); a padded batch of any padding side (official:
    right padding only) and several images per sample (``target`` per image); LLaVA-NeXT's row newlines are
    layout here and never dropped (the official counts them among the visual tokens it ranks).
    """

    name = "flowcut_llm"
    paper = "arXiv:2505.19536"
    signals = ("decoder_attention",)
    options = {"layer": 2, "ratio": None, "target": None}
    default_budget = 64
    default_positions = "compact"

    def validate_options(self) -> None:
        _validate_layer_ratio(self.name, self.config["layer"], self.config["ratio"])
        target = self.config["target"]
        if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 1):
            raise MethodOptionError(f"flowcut_llm option target={target!r} must be an int >= 1 (visual tokens kept "
                                    "per image from `layer` on).")

    def budget_overrides(self) -> list[str]:
        return [name for name in ("target", "ratio") if self.config[name] is not None]

    def pruning_layers(self, num_layers: int) -> list[int]:
        return _single_layer(self, num_layers)

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        target = self.config["target"]
        if target is None:
            return _single_stage_schedule(self, num_layers, num_visual, num_images, default_ratio=0.5)
        return [(self.config["layer"], min(num_visual, target * max(num_images, 1)))]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        layer = ctx.layers[ctx.layer - 1]
        q, k, v, scale = query_key_value(layer, ctx.previous_hidden, ctx.previous_position_embeddings, ctx.last)
        scores = torch.zeros(ctx.visual.shape, dtype=torch.float32, device=ctx.visual.device)
        for b in range(ctx.visual.shape[0]):
            columns = torch.nonzero(ctx.visual[b]).flatten()
            if columns.numel() == 0:
                continue
            last = ctx.last[b, 0]
            scores[b, columns] = flowcut_llm_scores(q[b], k[b][:, columns], v[b][:, last:last + 1],
                                                    v[b][:, columns], scale).to(scores.device)
        return scores
