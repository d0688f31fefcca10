"""In-LLM stages of the video methods: HoliTom's inner-LLM merge and PruneVid's in-LLM selection (they run on any
visual span; ``holitom`` / ``prunevid`` install them as companions of their pre-LLM stage)."""

from __future__ import annotations

import torch

from ..engine.attention_rows import attention_rows as _attention_rows
from ..errors import BudgetError, MethodOptionError
from ..registry import register_method
from ..selectors.video_llm import holitom_inner_merge
from .in_llm import LayerContext, LayerMethod, LayerSelection, _last_query_scores

__all__ = ["HoliTomInner", "PruneVidLLM"]


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


