"""In-LLM methods: drop visual tokens before a decoder layer k, from signals of the decoder itself.

A layer method declares its schedule (which layers, how many visual tokens survive each) and scores the
visual tokens at each of its layers; the engine does the gathering, positions, masks and KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import BudgetError
from ..engine.attention_rows import attention_rows
from ..errors import MethodOptionError
from ..registry import IN_LLM, Method, register_method


@dataclass
class LayerContext:
    """What a layer method sees at a pruning layer (prefill only).

    ``hidden``            [B, L, D] input of decoder layer ``layer`` (output of layer ``layer - 1``)
    ``position_embeddings`` (cos, sin) used by the layers of the current segment
    ``previous_hidden``   [B, L, D] input of layer ``layer - 1`` (None when layer == 0)
    ``previous_position_embeddings`` the (cos, sin) layer ``layer - 1`` used
    ``real``              [B, L] bool, False on padding
    ``visual``            [B, L] bool, the candidate visual tokens
    ``last``              [B, 1] index of each sample's last real token (the query of FastV / PDrop)
    """

    layer: int
    layers: nn.ModuleList
    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    previous_hidden: torch.Tensor | None
    previous_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    real: torch.Tensor
    visual: torch.Tensor
    last: torch.Tensor


class LayerMethod(Method):
    """Base of in-LLM methods."""

    stage = IN_LLM
    default_positions = "original"

    def schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        """[(layer, visual tokens kept from that layer on), ...] for one sample, layers ascending."""
        raise NotImplementedError

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """[B, L] float scores; the engine keeps the highest-scoring visual tokens."""
        raise NotImplementedError

    # -- budget -> equivalent tokens -------------------------------------------------------------------
    def _target_equivalent(self, num_visual: int, num_images: int) -> float:
        """Equivalent visual tokens (averaged over layers) the user asked for, for one sample."""
        if isinstance(self.budget, float):
            return self.budget * num_visual
        return min(float(self.budget * max(num_images, 1)), float(num_visual))


def _last_query_scores(layer: nn.Module, hidden, position_embeddings, ctx: LayerContext) -> torch.Tensor:
    rows = attention_rows(layer, hidden, position_embeddings, ctx.last, key_padding_mask=ctx.real,
                          average_heads=True)  # [B, 1, L]
    return rows[:, 0]


@register_method
class FastV(LayerMethod):
    """FastV — drop the visual tokens that the last prompt token attends to least (Chen et al., ECCV 2024,
    arXiv 2403.06764).

    At layer K (default 2) each visual token is scored by the attention it receives from the last prompt
    token in layer K−1 (head average; that single row is recomputed from layer K−1's q/k, no eager
    attention); the top tokens are kept for all later layers. ``ratio`` R is the fraction dropped (paper
    default 0.5; 0.75 is common); without ``ratio`` the kept count is derived from the budget so that the
    visual tokens averaged over all layers equal it: keep = (budget·L − K·N) / (L − K). Original positions.
    """

    name = "fastv"
    paper = "arXiv:2403.06764"
    signals = ("decoder_attention",)
    options = {"layer": 2, "ratio": None}
    default_budget = None  # paper default: R = 0.5 at K = 2

    def validate_options(self) -> None:
        layer, ratio = self.config["layer"], self.config["ratio"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise MethodOptionError(f"fastv layer={layer!r} must be an int ≥ 1 (attention of layer K−1 is used).")
        if ratio is not None and not (isinstance(ratio, int | float) and 0.0 <= ratio < 1.0):
            raise MethodOptionError(f"fastv ratio={ratio!r} must be the dropped fraction in [0, 1).")

    def schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        k = self.config["layer"]
        if k >= num_layers:
            raise MethodOptionError(f"fastv layer={k} is beyond the model's {num_layers} decoder layers.")
        ratio = self.config["ratio"]
        if ratio is None and self.budget is None:
            ratio = 0.5
        if ratio is not None:
            return [(k, round((1.0 - ratio) * num_visual))]
        target = self._target_equivalent(num_visual, num_images)
        keep = (target * num_layers - k * num_visual) / (num_layers - k)
        if keep < 0:
            minimum = k * num_visual / num_layers
            raise BudgetError(
                f"fastv at layer {k} processes all {num_visual} visual tokens in its first {k} layers, so the "
                f"smallest reachable budget is {minimum:.1f} equivalent tokens; raise the budget, lower "
                f"`layer`, or pass `ratio`."
            )
        return [(k, min(num_visual, round(keep)))]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        layer = ctx.layers[ctx.layer - 1]
        return _last_query_scores(layer, ctx.previous_hidden, ctx.previous_position_embeddings, ctx)


@register_method
class PyramidDrop(LayerMethod):
    """PyramidDrop — drop visual tokens in stages with a geometric keep ratio (Xing et al., CVPR 2025,
    arXiv 2410.17247).

    Stages at 1/4, 1/2 and 3/4 of the depth (layers 8, 16, 24 of a 32-layer LLM); each keeps a fraction λ
    of the previous stage's visual tokens (paper λ = 0.5: 100 → 50 → 25 → 12.5 %). The score is the
    attention from the last instruction token, recomputed at the stage layer from its input norm + q/k +
    RoPE for that single query. Without ``lambda_`` the ratio is solved from the budget (equivalent tokens
    averaged over layers). The official code re-indexes positions; default here ``original``
    (``positions="compact"`` reproduces the official behaviour).
    """

    name = "pdrop"
    paper = "arXiv:2410.17247"
    signals = ("decoder_attention",)
    options = {"layers": None, "lambda_": None}
    default_budget = None  # paper default: λ = 0.5

    def validate_options(self) -> None:
        lam = self.config["lambda_"]
        if lam is not None and not (isinstance(lam, int | float) and 0.0 < lam <= 1.0):
            raise MethodOptionError(f"pdrop lambda_={lam!r} must be in (0, 1].")
        layers = self.config["layers"]
        if layers is not None and (not isinstance(layers, list | tuple) or not layers
                                   or any(not isinstance(x, int) or x < 1 for x in layers)
                                   or list(layers) != sorted(set(layers))):
            raise MethodOptionError(f"pdrop layers={layers!r} must be ascending decoder layer indices ≥ 1.")

    def _layers(self, num_layers: int) -> list[int]:
        layers = self.config["layers"] or [num_layers // 4, num_layers // 2, 3 * num_layers // 4]
        layers = sorted({max(1, x) for x in layers})
        if layers[-1] >= num_layers:
            raise MethodOptionError(f"pdrop layers={layers} exceed the model's {num_layers} decoder layers.")
        return layers

    @staticmethod
    def _equivalent(lam: float, layers: list[int], num_layers: int, num_visual: int) -> float:
        bounds = [0, *layers, num_layers]
        return sum((bounds[i + 1] - bounds[i]) * num_visual * lam**i for i in range(len(bounds) - 1)) / num_layers

    def schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        layers = self._layers(num_layers)
        lam = self.config["lambda_"]
        if lam is None and self.budget is None:
            lam = 0.5
        if lam is None:
            target = self._target_equivalent(num_visual, num_images)
            minimum = self._equivalent(0.0, layers, num_layers, num_visual)
            if target < minimum:
                raise BudgetError(
                    f"pdrop with stages at {layers} keeps all {num_visual} visual tokens for {layers[0]} layers, "
                    f"so the smallest reachable budget is {minimum:.1f}; raise the budget or move the stages."
                )
            lo, hi = 0.0, 1.0
            for _ in range(60):  # the equivalent count grows monotonically with λ
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self._equivalent(mid, layers, num_layers, num_visual) < target else (lo, mid)
            lam = (lo + hi) / 2
        return [(layer, round(num_visual * lam ** (i + 1))) for i, layer in enumerate(layers)]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return _last_query_scores(ctx.layers[ctx.layer], ctx.hidden, ctx.position_embeddings, ctx)
