"""In-LLM stages of the video methods: HoliTom's inner-LLM merge and PruneVid's in-LLM selection (they run on any
visual span; ``holitom`` / ``prunevid`` install them as companions of their pre-LLM stage), and FrameFusion
(similarity merging across frames inside the decoder, then one attention pruning step)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.attention_rows import attention_rows as _attention_rows
from ..errors import BudgetError, MethodOptionError
from ..registry import register_method
from ..selectors.video_llm import (
    framefusion_merge,
    framefusion_merge_flags,
    framefusion_prune_count,
    framefusion_similarity,
    framefusion_weights,
    holitom_inner_merge,
)
from .in_llm import LayerContext, LayerMethod, LayerSelection, _last_query_scores

__all__ = ["FrameFusion", "HoliTomInner", "PruneVidLLM"]


def _check_fraction(name: str, option: str, value, low: float = 0.0, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise MethodOptionError(f"{name} {option}={value!r} must be a number in [{low}, {high}].")


def _check_int(name: str, option: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MethodOptionError(f"{name} {option}={value!r} must be an int >= {low}.")


def _scaled_layer(layer: int | None, official: int, official_depth: int, num_layers: int) -> int:
    """The official layer on a decoder of the official depth; on another depth the same fraction of it (rounded
    down, at least 1)."""
    if layer is not None:
        return layer
    return max(1, min(num_layers - 1, official * num_layers // official_depth))



@register_method
class HoliTomInner(LayerMethod):
    """HoliTom's inner-LLM merge (cokeshao/HoliTom @ e9b2972 ``holitom/modeling_qwen2.py`` L121-208): at decoder
    layer ``layer`` the visual tokens keep the top round(N · (1 − ``ratio``)) by the attention of the last prompt
    token at layer ``layer`` − 1 (head mean, recomputed from q/k: no eager attention), and every other visual token
    is averaged into the kept token whose hidden state is most cosine-similar, one at a time in sequence order
    ((kept + dropped) / 2, as the official loop). Kept tokens keep their original positions. ``layer`` None = 18 of
    28 (the official Qwen2-7B setting), scaled to this model's depth. With a budget instead of ``ratio``, the kept
    count makes the layer average equal the budget (as FastV's). Usually installed by ``holitom``."""

    name = "holitom_inner"
    paper = "HoliTom (NeurIPS'25, inner-LLM merge)"
    signals = ("decoder_attention",)
    options = {"layer": None, "ratio": None}
    default_budget = None

    def validate_options(self) -> None:
        if self.config["layer"] is not None:
            _check_int(self.name, "layer", self.config["layer"])
        if self.config["ratio"] is not None:
            _check_fraction(self.name, "ratio", self.config["ratio"], 0.0, 0.999)

    def budget_overrides(self) -> list[str]:
        return ["ratio"] if self.config["ratio"] is not None else []

    def _layer(self, num_layers: int) -> int:
        layer = _scaled_layer(self.config["layer"], 18, 28, num_layers)
        if layer >= num_layers:
            raise MethodOptionError(f"holitom_inner layer={layer} is at or beyond this model's {num_layers} decoder "
                                    f"layers; pass layer= between 1 and {num_layers - 1}.")
        return layer

    def pruning_layers(self, num_layers: int) -> list[int]:
        return [self._layer(num_layers)]

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        layer = self._layer(num_layers)
        ratio = self.config["ratio"]
        if ratio is None and self.budget is None:
            ratio = 0.5
        if ratio is not None:
            return [(layer, round(num_visual * (1 - ratio)))]
        target = self._target_equivalent(num_visual, num_images)
        keep = (target * num_layers - layer * num_visual) / (num_layers - layer)
        if keep < 0:
            raise BudgetError(f"holitom_inner at layer {layer} keeps all {num_visual} visual tokens for {layer} layers; "
                              f"the smallest reachable budget is {layer * num_visual / num_layers:.1f}.")
        return [(layer, max(1, min(num_visual, round(keep))))]

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        scores = _last_query_scores(ctx.layers[ctx.layer - 1], ctx.previous_hidden,
                                    ctx.previous_position_embeddings, ctx)
        out: list[LayerSelection | None] = []
        for b, k in enumerate(wanted):
            if k is None:
                out.append(None)
                continue
            columns = torch.nonzero(ctx.visual[b]).flatten()
            kept, new, weights = holitom_inner_merge(ctx.hidden[b, columns], scores[b, columns], k)
            changed = (weights > 0).sum(dim=1) > 1  # kept tokens that absorbed others
            out.append(LayerSelection(keep=columns[kept[~changed]], merged=new[changed],
                                      anchors=columns[kept[changed]], replaces=True))
        return out



@register_method
class PruneVidLLM(LayerMethod):
    """PruneVid's in-LLM stage (Visual-AI/PruneVid @ b12600c ``models/pllava/llama.py`` L1296-1314, L1400-1462,
    ``elastic_cache.py`` L108-146): at decoder layer ``layer`` (None: 10 of 32, scaled to this model's depth) keep
    the top int(N · ``alpha``) visual tokens by the attention of the text tokens after the last visual token (max
    over heads and over those queries, computed from layer ``layer``'s q/k — the official reads that layer's
    eager attention weights). Original positions. Usually installed by ``prunevid``; deviations there."""

    name = "prunevid_llm"
    paper = "PruneVid (ACL'25 Findings, in-LLM stage)"
    signals = ("decoder_attention",)
    options = {"layer": None, "alpha": 0.4}
    default_budget = None

    def validate_options(self) -> None:
        if self.config["layer"] is not None:
            _check_int(self.name, "layer", self.config["layer"])
        _check_fraction(self.name, "alpha", self.config["alpha"], 0.01, 1.0)

    def _layer(self, num_layers: int) -> int:
        layer = _scaled_layer(self.config["layer"], 10, 32, num_layers)
        if layer >= num_layers:
            raise MethodOptionError(f"prunevid_llm layer={layer} is at or beyond this model's {num_layers} decoder "
                                    f"layers; pass layer= between 1 and {num_layers - 1}.")
        return layer

    def pruning_layers(self, num_layers: int) -> list[int]:
        return [self._layer(num_layers)]

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        if self.budget is not None:
            layer = self._layer(num_layers)
            target = self._target_equivalent(num_visual, num_images)
            keep = (target * num_layers - layer * num_visual) / (num_layers - layer)
            return [(layer, max(1, min(num_visual, round(keep))))]
        return [(self._layer(num_layers), max(1, int(num_visual * self.config["alpha"])))]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        batch, length = ctx.visual.shape
        queries = []
        for b in range(batch):
            visual = torch.nonzero(ctx.visual[b]).flatten()
            real = torch.nonzero(ctx.real[b]).flatten()
            after = real[real > visual[-1]] if visual.numel() else real[-1:]
            queries.append(after if after.numel() else real[-1:])
        width = max(q.numel() for q in queries)
        index = torch.stack([torch.cat([q, q[-1:].expand(width - q.numel())]) for q in queries])  # [B, Q]
        rows = _attention_rows(ctx.layers[ctx.layer], ctx.hidden, ctx.position_embeddings, index,
                               key_padding_mask=ctx.real)  # [B, H, Q, L]
        return rows.amax(dim=(1, 2))


@dataclass
class _FrameFusionState:
    """One sample's FrameFusion state during one prefill (the official module's attributes)."""

    cost: float | None = None                              # FrameFusion's cost for this sample
    sparsities: list[float] = field(default_factory=list)  # merge fraction of every merging layer so far
    merging: bool = True                                   # official: not finish_merging
    pruning: bool = True                                   # official: not finish_pruning


@register_method
class FrameFusion(LayerMethod):
    """FrameFusion — similarity merging across frames, then importance pruning, inside the LLM (Fu et al., ICCV
    2025, arXiv 2501.01986). Official code: thu-nics/FrameFusion @ fbec1d2 (``framefusion/main.py`` L8-343:
    ``FrameFusion.forward``, ``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask``,
    ``_compute_pruning_ratio``; ``framefusion/models/qwen2/modeling_qwen2.py`` L44-67: merging at layer 0 before
    attention and after the attention of every layer, L166-178: the last query's attention;
    ``framefusion/interface.py``: defaults ``cost=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1``).

    Prefill only. Merging: every visual token is compared (cosine of the decoder's hidden states) with the token
    at the same place in the previous frame; the tokens with similarity >= ``similarity_lower_bound`` merge, each
    run of them along time collapsing into the token before it (the plain mean of that token and the run; the
    merged token keeps that earliest token's position). With s* the sparsity the remaining layers would need to
    meet ``cost`` and f the fraction of the visual tokens above the bound: f < s* merges them all and records f,
    and merging stops once f < ``ratio_lower_bound``; f >= s* merges only the int(s*·V) most similar tokens and
    ends everything (the cost is met). Pruning, at the next layer after merging stopped: the visual tokens keep the
    top round(V·(1 − p)) by the attention of the last prompt token (mean over heads, recomputed from that layer's
    q/k: no eager attention), p the sparsity that makes the average over all layers equal ``cost``. Kept and merged
    tokens keep their original positions (``positions="compact"`` re-indexes them instead).

    Budget: ``cost`` is the official budget, the visual tokens each decoder layer processes averaged over all
    layers, as a fraction of the sample's visual tokens — the project's "layer average" budget. A float budget is
    the cost; an int budget is the clip's (image's) equivalent visual tokens, cost = budget / visual tokens (per
    sample, capped at 1). ``cost`` given as an option overrides the budget (with a warning); neither: the official
    default 0.3. The merging is data dependent, so the cost is met exactly only when the last step can reach it:
    when the layers that already ran processed more than cost × layers (decoders shallower than the official 28
    layers, high similarity fractions just below s*), the prefill raises :class:`BudgetError`, as the official
    ``_compute_pruning_ratio`` raises ("The cost is too small"); and when merging only stops at the last layer no
    layer is left to prune, so the layer average stays above the cost (``stats()`` reports what was processed).

    Images: an image is a one-frame clip: no token has a predecessor, so nothing merges (f = 0 ends merging at
    layer 0) and the method is the pruning step alone at layer 1 (FastV at layer 1 with p from the cost). Tokens
    of different videos (or images) in one sample are never compared.

    Deviations from the official code: (1) the merges the official code makes after the attention of layer l
    (before its MLP) happen here before layer l + 1 (this project prunes between decoder layers), so the
    similarity is that of layer l's output and layer l's MLP still runs on the unmerged tokens; the merge at
    layer 0 before attention is the official one. The official cost formula counts merge i as acting from layer
    i on, which is exactly what happens here. (2) The pruning step likewise runs before layer l + 1 with layer
    l's attention (official: after layer l's attention). (3) ``num_layers`` is the model's decoder depth (official:
    28 hard-coded, Qwen2-7B). (4) Batches of any size, each sample with its own state (official: batch 1). (5)
    Similarities and means in float32; ties in the top-k broken by the lower index (official ``torch.topk``).
    (6) A LLaVA-OneVision video's single trailing newline is structural (never merged or counted); the official
    LLaVA-Video layout has a newline per row, which takes part in the merging. (7) Qwen3-VL: a merged token gets the
    deepstack rows of its members averaged like its hidden state (the official code has no Qwen3-VL).
    Fidelity: tests/test_framefusion.py runs a literal transcription of the official ``forward`` and this method's
    ``select`` on identical hidden states, point after point (same tokens, states, sparsities and end).
    """

    name = "framefusion"
    paper = "FrameFusion (ICCV'25), arXiv:2501.01986"
    signals = ("decoder_states", "decoder_attention")
    options = {"cost": None, "similarity_lower_bound": 0.6, "ratio_lower_bound": 0.1}
    default_budget = None  # the official cost 0.3
    adaptive = True

    def validate_options(self) -> None:
        if self.config["cost"] is not None:
            _check_fraction(self.name, "cost", self.config["cost"], 0.0, 1.0)
            if self.config["cost"] == 0:
                raise MethodOptionError("framefusion cost=0 keeps nothing; pass a cost in (0, 1].")
        _check_fraction(self.name, "similarity_lower_bound", self.config["similarity_lower_bound"], -1.0, 1.0)
        _check_fraction(self.name, "ratio_lower_bound", self.config["ratio_lower_bound"], 0.0, 1.0)

    def budget_overrides(self) -> list[str]:
        return ["cost"] if self.config["cost"] is not None else []

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        # every layer may merge or prune; the counts are upper bounds (``adaptive``)
        return [(layer, num_visual) for layer in range(num_layers)]

    def schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        return self.plan_schedule(num_layers, num_visual, num_images)  # nothing to warn about before the data

    def _cost(self, num_visual: int, num_images: int) -> float:
        if self.config["cost"] is not None:
            return float(self.config["cost"])
        if self.budget is None:
            return 0.3
        return self._target_equivalent(num_visual, num_images) / num_visual

    def prepare(self, inputs_embeds, real, visual, text, source) -> list[_FrameFusionState]:
        # a sample without visual tokens has nothing to do
        return [_FrameFusionState(merging=bool(row.any()), pruning=bool(row.any())) for row in visual]

    def active(self, prepared: list[_FrameFusionState]) -> bool:
        return any(state.merging or state.pruning for state in prepared)

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        num_layers = len(ctx.layers)
        scores = None
        out: list[LayerSelection | None] = []
        for b, count in enumerate(wanted):
            state: _FrameFusionState = ctx.prepared[b]
            if count is None or not (state.merging or state.pruning):
                out.append(None)
                continue
            if state.cost is None:  # the sample's first layer: its visual tokens as they enter the decoder
                state.cost = self._cost(count, ctx.images[b] if ctx.images else 1)
            columns = torch.nonzero(ctx.visual[b]).flatten()
            if state.merging:
                out.append(self._merge(ctx, b, columns, state, num_layers))
                continue
            if scores is None:  # the last prompt token's attention in the layer that just ran
                scores = _last_query_scores(ctx.layers[ctx.layer - 1], ctx.previous_hidden,
                                            ctx.previous_position_embeddings, ctx)
            state.pruning = False
            keep = self._checked(framefusion_prune_count, count, state, num_layers, ctx.layer)
            if keep >= count:
                out.append(None)
                continue
            order = torch.sort(scores[b, columns].float(), descending=True, stable=True).indices
            out.append(LayerSelection(keep=torch.sort(columns[order[:keep]]).values))
        return out

    def _merge(self, ctx: LayerContext, b: int, columns: torch.Tensor, state: _FrameFusionState,
               num_layers: int) -> LayerSelection | None:
        hidden, patch = ctx.hidden[b, columns], ctx.patch[b, columns]  # [V, D], [V]
        similarity = framefusion_similarity(hidden, patch)
        c = self.config
        flags, state.sparsities, finished_merging, finished_pruning = self._checked(
            framefusion_merge_flags, similarity, state, num_layers, ctx.layer, c["similarity_lower_bound"],
            c["ratio_lower_bound"])
        state.merging, state.pruning = not finished_merging, not finished_pruning
        if not bool(flags.any()):
            return None
        keep, new, groups = framefusion_merge(hidden, patch, flags)
        heads = torch.tensor([head for head, _ in groups], dtype=torch.long, device=columns.device)
        plain = keep.clone()
        plain[heads] = False
        return LayerSelection(keep=columns[plain], merged=new[heads], anchors=columns[heads], replaces=True,
                              weights=framefusion_weights(groups, columns.numel(), columns.device))

    def _checked(self, step, first, state: _FrameFusionState, num_layers: int, layer: int, *rest):
        """Run a FrameFusion step; the official ValueError of an unreachable cost becomes a BudgetError."""
        try:
            return step(first, state.sparsities, state.cost, num_layers, *rest)
        except ValueError:
            spent = 0.0
            share = 1.0
            for value in state.sparsities:
                share *= 1 - value
                spent += share
            raise BudgetError(
                f"framefusion cost={state.cost:.3g} cannot be met on this input: its first {len(state.sparsities)} "
                f"decoder layer(s) already processed {spent:.2f} layers' worth of the visual tokens, more than "
                f"cost x {num_layers} layers = {state.cost * num_layers:.2f} (at decoder layer {layer}). "
                "Raise the budget (or cost=); on shallow decoders the least reachable cost is about 1/layers."
            ) from None

