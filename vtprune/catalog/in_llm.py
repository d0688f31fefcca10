"""In-LLM methods: drop visual tokens before a decoder layer k, from signals of the decoder itself.

A layer method declares its schedule (which layers, how many visual tokens survive each) and scores the
visual tokens at each of its layers; the engine does the gathering, positions, masks and KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..budget import BudgetError
from ..engine.attention_rows import attention_rows, key_states, rope_only_rows
from ..engine.positions import rope_rows
from ..errors import MethodOptionError
from ..registry import FEW_TOKENS, IN_LLM, Method, register_method
from ..selectors.dart import dart_select, pick_pivots
from ..selectors.sparsevlm import debiased_scores, head_mean_scores, recycle, select_raters
from ..selectors.transprune import transition_weight, transprune_scores, transprune_select


@dataclass
class LayerContext:
    """What a layer method sees at a pruning layer (prefill only). Columns are those of the padded batch.

    ``hidden``            [B, L, D] input of decoder layer ``layer`` (output of layer ``layer - 1``)
    ``position_embeddings`` (cos, sin) used by the layers of the current segment
    ``previous_hidden``   [B, L, D] input of layer ``layer - 1`` (None when layer == 0)
    ``previous_position_embeddings`` the (cos, sin) layer ``layer - 1`` used
    ``real``              [B, L] bool, False on padding
    ``visual``            [B, L] bool, the candidate visual tokens
    ``text``              [B, L] bool, text tokens (never pruned)
    ``last``              [B, 1] index of each sample's last real token (the query of FastV / PDrop)
    ``source``            per sample LongTensor[n_b]: original sequence position of each real column, in order
    ``prepared``          what the method's :meth:`LayerMethod.prepare` returned for this forward
    ``norm``              the decoder's final norm (DART measures duplication after it)
    ``previous_position_ids`` [..., B, L] language-model-level position ids layer ``layer - 1`` used ([B, L], or
                          M-RoPE [3|4, B, L])
    ``rotary``            the decoder's rotary embedding module (position ids -> (cos, sin))
    ``patch``             [B, L] long: the place of each visual column inside its frame, shared by the tokens of
                          the same place in the frames of one video and by nothing else (a merged column: its
                          anchor's); -1 for text, padding and structural tokens (SampleLayout.patch_index)
    ``images``            per sample: the number of images and videos it holds
    ``merged``            per sample BoolTensor[n_b]: which real columns (in ``source`` order) are merged tokens
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
    text: torch.Tensor | None = None
    source: list[torch.Tensor] | None = None
    prepared: Any = None
    norm: nn.Module | None = None
    previous_position_ids: torch.Tensor | None = None
    rotary: nn.Module | None = None
    patch: torch.Tensor | None = None
    images: list[int] | None = None
    merged: list[torch.Tensor] | None = None

    def sample_local_position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer - 1``'s (cos, sin) with each sample's positions counted from its first real token, as
        if it ran alone: quantities that are not invariant to a shift of all positions (the L1 norm of rotated
        keys) then do not depend on how much padding the batch put in front of the sample."""
        positions = rope_rows(self.previous_position_ids)  # [B, L] or M-RoPE [3, B, L]
        first = self.real.float().argmax(dim=-1)  # [B] first real column
        start = positions.gather(-1, first.view(*([1] * (positions.dim() - 2)), -1, 1).expand(
            *positions.shape[:-2], -1, 1).to(positions.device))
        return self.rotary(self.previous_hidden, position_ids=positions - start)


@dataclass
class LayerSelection:
    """One sample's choice at a pruning layer, in padded-batch columns.

    ``keep``     LongTensor[k]: columns of the visual tokens kept (exactly the scheduled count)
    ``merged``   Tensor[m, D] or None: new tokens (hidden states entering the layer), e.g. recycled clusters
    ``anchors``  LongTensor[m]: column whose position each merged token takes
    ``replaces`` True: each merged token replaces its anchor (a visual column not in ``keep``), and ``keep`` plus
                 the merged tokens make the scheduled count; False: merged tokens come on top of ``keep``
    ``weights``  Tensor[m, V] or None: merged token i = Σ_j weights[i, j] · (hidden state of the j-th visual
                 candidate column, columns ascending); the engine builds the merged tokens' per-token side inputs
                 (Qwen3-VL deepstack rows) with them. Without weights, merging before a layer that still receives
                 side inputs is refused.
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    replaces: bool = False
    weights: torch.Tensor | None = None


class LayerMethod(Method):
    """Base of in-LLM methods: a schedule, and a selection (by default: top-k of :meth:`score`)."""

    stage = IN_LLM
    default_positions = "original"
    #: False: the schedule's counts are exact (every sample keeps exactly that many visual tokens at that layer).
    #: True: the method decides at run time (FrameFusion's similarity merging): the schedule names the layers at
    #: which :meth:`select` is called, with the sample's current visual count as an upper bound in ``wanted``;
    #: select returns None for a sample it leaves unchanged, and the engine records a stage only where the
    #: method changed something.
    adaptive: ClassVar[bool] = False
    #: vision-encoder signals (names as in ``signals``, which must list them too) the method reads per visual token:
    #: the engine then calls ``prepare(..., vision=...)`` with, per sample, ``{name: Tensor[n_b] float32}`` over the
    #: sample's real columns in ``source`` order — the token's signal value, NaN for text and merged tokens
    vision_signals: tuple[str, ...] = ()

    def schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        """[(layer, visual tokens kept from that layer on), ...] for one sample, layers ascending
        (:meth:`plan_schedule`), with a warning when the plan is degenerate."""
        planned = self.plan_schedule(num_layers, num_visual, num_images)
        self._warn_about_schedule(planned, num_layers, num_visual, num_images)
        return planned

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        """The method's schedule for one sample (see :meth:`schedule`); subclasses implement this one."""
        raise NotImplementedError(f"{type(self).__name__} must implement plan_schedule()")

    def pruning_layers(self, num_layers: int) -> list[int]:
        """The decoder layers this method prunes before on a model with ``num_layers`` layers; raises
        MethodOptionError when its options do not fit that depth. The default (for methods that do not
        declare their layers) checks nothing."""
        return []

    def observed_layers(self, num_layers: int) -> list[int]:
        """Decoder layers whose sublayer (attention, MLP) inputs and outputs the method reads during the
        prefill (:meth:`observe`); the engine hooks those sublayers only when this is non-empty. Default: none."""
        return []

    def observe(self, layer: int, kind: str, before: torch.Tensor, after: torch.Tensor, real: torch.Tensor,
                source: list[torch.Tensor], prepared: Any) -> None:
        """Called during the prefill after sublayer ``kind`` ("attention" or "mlp") of decoder ``layer`` (one of
        :meth:`observed_layers`) ran: ``before`` [B, L, D] its input (after the pre-norm), ``after`` [B, L, D] its
        output, ``real`` [B, L] bool (False on padding), ``source`` per sample the original position of each
        real column, ``prepared`` what :meth:`prepare` returned. Must not change anything the model uses."""
        raise NotImplementedError(f"{type(self).__name__} observes layers but does not implement observe()")

    def check_model(self, num_layers: int) -> None:
        """Refuse at ``apply()`` a schedule the model's depth cannot hold (it would fail on every forward)."""
        self.pruning_layers(num_layers)

    def _warn_about_schedule(self, planned: list[tuple[int, int]], num_layers: int, num_visual: int,
                             num_images: int) -> None:
        """Warn (once) when a stage leaves fewer than FEW_TOKENS tokens per image, or the first stage keeps every
        visual token although the budget asked for fewer."""
        if not planned:
            return
        images = max(num_images, 1)
        layer, kept = planned[-1]
        if kept < FEW_TOKENS * images <= num_visual:
            self.warn_once(
                f"keeps {kept} visual token(s) for {images} image(s) from decoder layer {layer} of {num_layers} on "
                f"(budget={self.budget!r}): fewer than {FEW_TOKENS} per image, the model barely sees the image; "
                "raise the budget, or prune fewer layers in (see the method's options)."
            )
        first_layer, first = planned[0]
        if first >= num_visual and self.budget != 1.0 and not self.budget_overrides():
            self.warn_once(
                f"budget={self.budget!r} keeps all {num_visual} visual tokens at decoder layer {first_layer}: "
                "nothing is pruned; lower the budget."
            )

    def cache_cut_from(self, num_layers: int) -> int | None:
        """The first decoder layer whose KV cache is cut, after the prefill, to the tokens the last pruning layer
        kept (MustDrop's decoding stage; the engine's :func:`~vtprune.engine.layer_stage.cut_cache_to_final`).
        None (default): every layer keeps the cache of the tokens it processed."""
        return None

    def active(self, prepared: Any) -> bool:
        """Adaptive methods: whether :meth:`select` may still change anything in this forward (``prepared`` is
        what :meth:`prepare` returned); False lets the engine skip the remaining layers. Default: True."""
        return True

    def prepare(self, inputs_embeds: torch.Tensor, real: torch.Tensor, visual: torch.Tensor,
                text: torch.Tensor, source: list[torch.Tensor]) -> Any:
        """Called once per prefill with the language model's input [B, L, D] and masks; the result reaches
        every stage as ``ctx.prepared``. Default: nothing."""
        return None

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """[B, L] float scores; the default :meth:`select` keeps the highest-scoring visual tokens."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or select()")

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        """Per sample: the visual columns to keep (``wanted[b]`` of them), or None to keep them all."""
        return top_scored(ctx, self.score(ctx), wanted)

    # -- budget -> equivalent tokens -------------------------------------------------------------------
    def _target_equivalent(self, num_visual: int, num_images: int) -> float:
        """Equivalent visual tokens (averaged over layers) the user asked for, for one sample."""
        if isinstance(self.budget, float):
            return self.budget * num_visual
        return min(float(self.budget * max(num_images, 1)), float(num_visual))


def top_scored(ctx: LayerContext, scores: torch.Tensor, wanted: list[int | None]) -> list[LayerSelection | None]:
    """Per sample, the ``wanted[b]`` visual columns with the highest ``scores`` [B, L] (None: keep all)."""
    out: list[LayerSelection | None] = []
    for b, k in enumerate(wanted):
        if k is None:
            out.append(None)
            continue
        candidates = torch.nonzero(ctx.visual[b]).flatten()
        order = torch.argsort(scores[b, candidates], descending=True, stable=True)
        out.append(LayerSelection(keep=torch.sort(candidates[order[:k]]).values))
    return out


def geometric_layer_average(lam: float, layers: list[int], num_layers: int, num_visual: int) -> float:
    """Visual tokens per decoder layer, averaged over ``num_layers`` layers, when the ``num_visual`` tokens are cut to
    ``num_visual · lam^i`` from pruning layer ``layers[i − 1]`` on (all of them before ``layers[0]``)."""
    bounds = [0, *layers, num_layers]
    return sum((bounds[i + 1] - bounds[i]) * num_visual * lam**i for i in range(len(bounds) - 1)) / num_layers


def geometric_ratio(target: float, layers: list[int], num_layers: int, num_visual: int) -> float:
    """The ``lam`` in [0, 1] whose :func:`geometric_layer_average` is ``target`` (bisection: the average grows
    monotonically with ``lam``); the caller checks that ``target`` lies between the averages at 0 and 1."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if geometric_layer_average(mid, layers, num_layers, num_visual) < target else (lo, mid)
    return (lo + hi) / 2


def _last_query_scores(layer: nn.Module, hidden, position_embeddings, ctx: LayerContext) -> torch.Tensor:
    rows = attention_rows(layer, hidden, position_embeddings, ctx.last, key_padding_mask=ctx.real,
                          average_heads=True)  # [B, 1, L]
    return rows[:, 0]


def _single_stage_schedule(method: LayerMethod, num_layers: int, num_visual: int, num_images: int,
                           default_ratio: float) -> list[tuple[int, int]]:
    """One pruning layer K (option ``layer``): keep (1 − ``ratio``) of the visual tokens, or, from an int /
    float budget, the count whose layer average equals it: keep = (budget·L − K·N) / (L − K)."""
    k = method.config["layer"]
    if k >= num_layers:
        raise MethodOptionError(f"{method.name} layer={k} is beyond the model's {num_layers} decoder layers.")
    ratio = method.config["ratio"]
    if ratio is None and method.budget is None:
        ratio = default_ratio
    if ratio is not None:
        return [(k, round((1.0 - ratio) * num_visual))]
    target = method._target_equivalent(num_visual, num_images)
    keep = (target * num_layers - k * num_visual) / (num_layers - k)
    if keep < 0:
        minimum = k * num_visual / num_layers
        raise BudgetError(
            f"{method.name} at layer {k} processes all {num_visual} visual tokens in its first {k} layers, so "
            f"the smallest reachable budget is {minimum:.1f} equivalent tokens; raise the budget, lower "
            f"`layer`, or pass `ratio`."
        )
    return [(k, max(1, min(num_visual, round(keep))))]


def _single_layer(method: LayerMethod, num_layers: int) -> list[int]:
    """The pruning layer K of FastV / DART, which must leave at least one decoder layer after it."""
    k = method.config["layer"]
    if k >= num_layers:
        fix = ("use a pre-LLM method" if num_layers < 2 else "pass layer=1" if num_layers == 2
               else f"pass layer= between 1 and {num_layers - 1}")
        raise MethodOptionError(f"{method.name} layer={k} is at or beyond this model's {num_layers} decoder layers, "
                                f"so it would prune nothing and fail on every forward; {fix}.")
    return [k]


def _validate_layer_ratio(name: str, layer, ratio) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise MethodOptionError(f"{name} layer={layer!r} must be an int ≥ 1 (layer K−1's states are used).")
    if ratio is not None and not (isinstance(ratio, int | float) and 0.0 <= ratio < 1.0):
        raise MethodOptionError(f"{name} ratio={ratio!r} must be the dropped fraction in [0, 1).")


def _ascending_layers(layers, minimum: int) -> bool:
    """Whether ``layers`` is a non-empty list/tuple of strictly ascending int layer indices >= ``minimum``."""
    return (isinstance(layers, list | tuple) and bool(layers)
            and all(not isinstance(x, bool) and isinstance(x, int) and x >= minimum for x in layers)
            and list(layers) == sorted(set(layers)))


@register_method
class FastV(LayerMethod):
    """FastV — drop the visual tokens that the last prompt token attends to least (Chen et al., ECCV 2024,
    arXiv 2403.06764). Official code: pkunlp-icler/FastV @ d1659729 (``src/FastV/llava-hf/transformers/src/
    transformers/models/llama/modeling_llama.py``, ``fastv_forward`` L955-1120: the drop at L1072-1101,
    layer K−1's attention requested at L1105).

    At layer K (default 2) each visual token is scored by the attention it receives from the last prompt
    token in layer K−1 (head average; that single row is recomputed from layer K−1's q/k, no eager
    attention); the top tokens are kept for all later layers, at their original positions (the official
    passes ``keep_indexs`` as position ids). ``ratio`` R is the fraction dropped (paper default 0.5; 0.75
    is common); the kept count is the official ``round(N·(1−R))`` (Python rounding). Without ``ratio`` the
    kept count is derived from the budget so that the visual tokens averaged over all layers equal it:
    keep = round((budget·L − K·N) / (L − K)).

    Fidelity: identical kept sets to a transcription of the official selection (tests/test_fidelity_in_llm.py).
    Differences, none of them in the selection: the official prunes one sample with fixed image
    start/length; here every sample of a padded batch is pruned at its own visual positions.
    """

    name = "fastv"
    paper = "arXiv:2403.06764"
    signals = ("decoder_attention",)
    options = {"layer": 2, "ratio": None}
    default_budget = None  # paper default: R = 0.5 at K = 2

    def validate_options(self) -> None:
        _validate_layer_ratio(self.name, self.config["layer"], self.config["ratio"])

    def budget_overrides(self) -> list[str]:
        return ["ratio"] if self.config["ratio"] is not None else []

    def pruning_layers(self, num_layers: int) -> list[int]:
        return _single_layer(self, num_layers)

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        return _single_stage_schedule(self, num_layers, num_visual, num_images, default_ratio=0.5)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        layer = ctx.layers[ctx.layer - 1]
        return _last_query_scores(layer, ctx.previous_hidden, ctx.previous_position_embeddings, ctx)


#: PDrop's kept counts are ``int(N · ratio)`` with the ratio as written in the official scripts (decimal
#: literals such as 0.125); λ^i computed in floating point can fall a hair below such a literal
#: (0.6**3 = 0.21599999999999997), so the truncation gets this guard
_PDROP_EPSILON = 1e-9


@register_method
class PyramidDrop(LayerMethod):
    """PyramidDrop — drop visual tokens in stages with a geometric keep ratio (Xing et al., CVPR 2025,
    arXiv 2410.17247). Official code: Cooperx521/PyramidDrop @ 6444f304 (``llava/model/modeling_llama_pdrop.py``:
    ``pdrop_forward`` L1106-1290, the drop after layer ``rank_layer − 1`` at L1222-1268; ``pdrop_rank_drop``
    L1291-1465: counts L1306-1307, query and score L1352-1406, compact positions L1446; defaults in
    ``scripts/v1_5/pdrop_eval/*.sh``: ``--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]``).

    Stages at 1/4, 1/2 and 3/4 of the depth (layers 8, 16, 24 of a 32-layer LLM); stage i keeps
    ``int(N·λ^i)`` of the N visual tokens (the official truncation of ``image_token_ratio_list``; paper λ = 0.5:
    100 → 50 → 25 → 12.5 %, 576 → 288 → 144 → 72). The score is the attention from the last instruction
    token, recomputed at the stage layer from its input norm + q/k + RoPE for that single query, softmax
    over the causal row, mean over heads. Positions: ``compact`` by default, as the official code (it
    re-indexes ``position_ids`` to ``arange`` after every stage); ``positions="original"`` keeps each token's
    original position instead.

    Budget: without ``lambda_`` the ratio is solved from the budget (equivalent tokens averaged over
    layers); the official truncation then makes each stage keep up to one token less than the exact solution,
    so the layer average can fall short of the budget by less than one token (``stats().samples[i].
    equivalent_tokens`` reports what was kept). A budget below what these stages can reach (they keep every
    token for L/4 layers, so at least N/4 equivalent tokens) moves the stages earlier, to 1/16, 1/4 and 1/2
    of the depth (2, 8, 16 of 32) — only when ``layers`` is not given; ``stats()`` reports the stages used.

    Fidelity: identical kept sets to a transcription of ``pdrop_rank_drop`` (tests/test_fidelity_in_llm.py).
    Deviations: λ^i is truncated with a 1e-9 guard (see ``_PDROP_EPSILON``); the official
    ``image_token_ratio_list`` may be any decreasing list, here it is geometric (``lambda_``).
    """

    name = "pdrop"
    paper = "arXiv:2410.17247"
    signals = ("decoder_attention",)
    options = {"layers": None, "lambda_": None}
    default_budget = None  # paper default: λ = 0.5
    default_positions = "compact"

    def validate_options(self) -> None:
        lam = self.config["lambda_"]
        if lam is not None and not (isinstance(lam, int | float) and 0.0 < lam <= 1.0):
            raise MethodOptionError(f"pdrop lambda_={lam!r} must be in (0, 1].")
        layers = self.config["layers"]
        if layers is not None and (not isinstance(layers, list | tuple) or not layers
                                   or any(not isinstance(x, int) or x < 1 for x in layers)
                                   or list(layers) != sorted(set(layers))):
            raise MethodOptionError(f"pdrop layers={layers!r} must be ascending decoder layer indices ≥ 1.")

    def _layers(self, num_layers: int, low_budget: bool = False) -> list[int]:
        if self.config["layers"]:
            layers = self.config["layers"]
        elif low_budget:
            layers = [round(num_layers / 16), num_layers // 4, num_layers // 2]
        else:
            layers = [num_layers // 4, num_layers // 2, 3 * num_layers // 4]
        layers = sorted({max(1, x) for x in layers})
        if layers[-1] >= num_layers:
            raise MethodOptionError(f"pdrop layers={layers} reach beyond this model's {num_layers} decoder layers "
                                    f"(0..{num_layers - 1}); pass layers= below {num_layers}"
                                    + ("" if num_layers > 1 else ", or use a pre-LLM method") + ".")
        return layers

    @staticmethod
    def _equivalent(lam: float, layers: list[int], num_layers: int, num_visual: int) -> float:
        return geometric_layer_average(lam, layers, num_layers, num_visual)

    @staticmethod
    def stage_counts(num_visual: int, lam: float, stages: int) -> list[int]:
        """The official kept count of each stage: ``int(N · λ^i)``, i = 1..stages."""
        return [int(num_visual * lam ** (i + 1) + _PDROP_EPSILON) for i in range(stages)]

    def budget_overrides(self) -> list[str]:
        return ["lambda_"] if self.config["lambda_"] is not None else []

    def pruning_layers(self, num_layers: int) -> list[int]:
        return self._layers(num_layers)

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        layers = self._layers(num_layers)
        lam = self.config["lambda_"]
        if lam is None and self.budget is None:
            lam = 0.5
        if lam is None:
            target = self._target_equivalent(num_visual, num_images)
            minimum = self._equivalent(0.0, layers, num_layers, num_visual)
            if target < minimum and not self.config["layers"]:
                layers = self._layers(num_layers, low_budget=True)
                minimum = self._equivalent(0.0, layers, num_layers, num_visual)
            if target < minimum:
                raise BudgetError(
                    f"pdrop with stages at {layers} keeps all {num_visual} visual tokens for {layers[0]} layers, "
                    f"so the smallest reachable budget is {minimum:.1f}; raise the budget or move the stages."
                )
            lam = geometric_ratio(target, layers, num_layers, num_visual)
        return list(zip(layers, self.stage_counts(num_visual, lam, len(layers)), strict=True))

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return _last_query_scores(ctx.layers[ctx.layer], ctx.hidden, ctx.position_embeddings, ctx)


#: DART's paper default: 77.8 % reduction (the official scripts pass ``0.778 128`` on LLaVA-1.5's 576 tokens)
_DART_REDUCTION = 0.778


@register_method
class DART(LayerMethod):
    """DART — keep the visual tokens least duplicated by a few pivots (Wen et al., 2025, arXiv 2502.11494).
    Official code: ZichenWen1/DART @ 5a19452f (``llava/model/language_model/modeling_llama_self.py``:
    ``DART.forward`` L331-359, ``get_retained_image_token`` L397-449; defaults in
    ``llava/eval/model_vqa_loader.py`` L172-178 and the README's ``bash scripts/v1_5/eval/*.sh 0.778 128``;
    read from the fork xqy1111111/DART, whose history holds that upstream commit unchanged).

    At layer K (default 2): pivots are the ``pivots``/2 visual tokens and ``pivots``/2 text tokens after the
    image with the largest L1 norm of their layer-(K−1) key states (heads concatenated, after RoPE; default 8
    pivots in all; RoPE applied with each sample's positions counted from its first token, so that the L1
    norm — not invariant to a shift of positions — does not depend on batch padding). Duplication is the
    cosine similarity of the layer-(K−1) output after the decoder's final norm. The pivots are visited in
    the official order: the official code iterates a Python ``set`` of the pivots' sequence positions; the
    same set is built here from each sample's positions counted from its first real token (its index in the
    sequence as if it ran alone), so the order is CPython's deterministic set order (see
    :func:`vtprune.selectors.dart.set_iteration_order`). Each pivot in turn adds the TOKEN_TOPK least similar
    not-yet-chosen visual tokens; kept = visual pivots ∪ chosen, original positions. No attention weights.

    ``pivots`` P splits into ⌈P/2⌉ visual and ⌊P/2⌋ text pivots (the official ``pivot_image_token`` /
    ``pivot_text_token``, 4 and 4). Kept count — the official ``visual pivots + P × TOKEN_TOPK``
    (4 + 8·TOKEN_TOPK):

    * ``max_num_trunction=T`` (the official flag, its spelling): TOKEN_TOPK = T // pivots (T = 128 → 16 → 132).
    * ``ratio=r`` (the official ``reduction_ratio`` without ``max_num_trunction``): TOKEN_TOPK =
      floor(N·(1−r) / pivots) (r = 0.778, N = 576 → 15 → 124); ``ratio=0`` keeps every token.
    * default (no budget, no option): the official run ``0.778 128``, scaled to the model: T = round(N·(1−0.778))
      (128 on LLaVA-1.5's 576 tokens → 132 kept).
    * an int / float budget: the count whose layer average equals the budget, keep = (budget·L − K·N)/(L − K),
      is moved to the nearest count the official rule can keep (TOKEN_TOPK = ⌊(keep − 4)/8 + ½⌋), so the layer
      average misses the budget by up to pivots/2 · (L−K)/L tokens; ``stats().samples[i].equivalent_tokens``
      reports what was kept. A keep at or above N keeps every token; a keep of at most ⌈P/2⌉ keeps that
      many visual pivots (the highest key norms) and nothing else.

    The text pivots are chosen, as in the official code, among all tokens after the image (here: after the
    sample's last visual token). Fidelity: identical kept sets to a transcription of
    ``get_retained_image_token`` (tests/test_fidelity_in_llm.py). Deviations (the official would fail): where
    the official count exceeds N every token is kept; where fewer than ⌊P/2⌋ tokens follow the image, the
    text pivots are those there are and the slots are shared over the pivots there are (the first visited
    take the remainder). The official LLaVA-NeXT branch (L413-417, ``retain_token_num_for_llava_next``,
    default 320) is ``max_num_trunction`` capped at N − 4 (``max_num_trunction=320`` reproduces its count); it
    counts the row newlines among the candidates, which vtprune keeps as structural tokens (HF layout).
    """

    name = "dart"
    paper = "arXiv:2502.11494"
    signals = ("decoder_states",)
    options = {"layer": 2, "ratio": None, "pivots": 8, "max_num_trunction": None}
    default_budget = None  # paper default: 77.8 % reduction at K = 2 (official run "0.778 128")

    def validate_options(self) -> None:
        _validate_layer_ratio(self.name, self.config["layer"], self.config["ratio"])
        pivots = self.config["pivots"]
        if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 1:
            raise MethodOptionError(f"dart pivots={pivots!r} must be a positive int (paper: 8).")
        cap = self.config["max_num_trunction"]
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise MethodOptionError(f"dart max_num_trunction={cap!r} must be an int ≥ 0 (official: 128).")

    def budget_overrides(self) -> list[str]:
        return [name for name in ("ratio", "max_num_trunction") if self.config[name] is not None]

    def pruning_layers(self, num_layers: int) -> list[int]:
        return _single_layer(self, num_layers)

    def official_count(self, num_visual: int, token_topk: int) -> int:
        """visual pivots + pivots × TOKEN_TOPK, at most N."""
        total = self.config["pivots"]
        return min(num_visual, (total + 1) // 2 + total * max(0, token_topk))

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        total = self.config["pivots"]
        cap, ratio = self.config["max_num_trunction"], self.config["ratio"]
        if cap is not None or ratio is not None or self.budget is None:
            _single_layer(self, num_layers)
            if cap is not None:
                topk = cap // total
            elif ratio == 0.0:  # nothing to reduce: every token (4 + 8·floor(N/8) need not be N)
                return [(self.config["layer"], num_visual)]
            elif ratio is not None:
                topk = int(num_visual * (1.0 - ratio) // total)
            else:
                topk = round(num_visual * (1.0 - _DART_REDUCTION)) // total
            return [(self.config["layer"], self.official_count(num_visual, topk))]
        [(layer, keep)] = _single_stage_schedule(self, num_layers, num_visual, num_images, default_ratio=0.0)
        visual_pivots = (total + 1) // 2
        if keep >= num_visual or keep <= visual_pivots:
            return [(layer, keep)]
        return [(layer, self.official_count(num_visual, int((keep - visual_pivots) / total + 0.5)))]

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        keys = key_states(ctx.layers[ctx.layer - 1], ctx.previous_hidden, ctx.sample_local_position_embeddings())
        key_norms = keys.float().abs().sum(dim=(1, 3))  # [B, Hkv, L, dh] -> [B, L]
        features = ctx.norm(ctx.hidden) if ctx.norm is not None else ctx.hidden  # [B, L, D]
        total = self.config["pivots"]
        visual_pivots = (total + 1) // 2
        out: list[LayerSelection | None] = []
        for b, k in enumerate(wanted):
            if k is None:
                out.append(None)
                continue
            index = torch.cumsum(ctx.real[b].long(), dim=0) - 1  # each column's index in the sample alone
            visual = torch.nonzero(ctx.visual[b]).flatten()
            text = torch.nonzero(ctx.text[b]).flatten()
            after = text[text > visual.max()]  # the text after the image (the question)
            text = after if after.numel() else text
            text_pivots = text[pick_pivots(key_norms[b, text], total - visual_pivots)]
            kept = dart_select(features[b, visual], key_norms[b, visual], features[b, text_pivots], k,
                               visual_pivots=visual_pivots, visual_positions=index[visual],
                               pivot_positions=index[text_pivots])
            out.append(LayerSelection(keep=visual[kept]))
        return out


#: SparseVLM's official layers (``pruning_loc``): layer ℓ runs on every token and scores them; the drop applies
#: to its output, so the shorter sequence enters layer ℓ + 1
_SPARSEVLM_STAGES = (2, 6, 15)
#: official ``sparse_token_dict`` (score.py) per version: RETAIN_TOKN -> visual tokens kept at the three stages
#: (LLaVA-1.5-7B: 576 visual tokens, 32 layers)
_SPARSEVLM_SCHEDULES = {
    "1.5": {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)},
    "2.0": {64: (66, 34, 20), 96: (246, 54, 28), 128: (238, 108, 60), 192: (300, 200, 118)},
}
#: position convention of each official version: v1.5 truncates the position ids to the new length
#: (compact), v2.0 gathers them (original)
_SPARSEVLM_POSITIONS = {"1.5": "compact", "2.0": "original"}
#: the labels of earlier vtprune releases, mapped to the official versions they were closest to
_SPARSEVLM_OLD_VERSIONS = {1: "1.5", 2: "2.0"}


def _sparsevlm_version(value: Any) -> Any:
    """The official version name for ``value`` ("1.5" / "2.0", also as floats); the old ints 1 / 2 map to
    "1.5" / "2.0" with a DeprecationWarning; anything else is returned unchanged (refused by validation)."""
    import warnings

    from ..registry import _caller_level

    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in _SPARSEVLM_OLD_VERSIONS:
        new = _SPARSEVLM_OLD_VERSIONS[value]
        warnings.warn(f"sparsevlm version={value} is deprecated; it now means the official version "
                      f"{new!r}: pass version={new!r}.", DeprecationWarning, stacklevel=_caller_level())
        return new
    if isinstance(value, float) and value in (1.5, 2.0):
        return f"{value:.1f}"
    return value


@register_method
class SparseVLM(LayerMethod):
    """SparseVLM — text-guided visual token sparsification (Zhang et al., ICML 2025, arXiv 2410.04417), in
    its two official versions: ``version="1.5"`` (default) and ``version="2.0"`` (SparseVLM+).

    Both as the official code runs them (Gumpest/SparseVLMs @ 26a5f48, ``modelling_sparse_llama.py``,
    ``score.py``, ``utils.py``; the version is its ``USE_VERSION`` switch):

    * Raters: the text tokens after the image whose relevance to it (softmax over text of visual·textᵀ on
      the LLM input embeddings, averaged over visual rows) is strictly above the mean relevance.
    * Stages: at layers ``layers`` = (2, 6, 15) (of 32; scaled to the model's depth) layer ℓ runs on every
      token — and caches every token — and its attention from the raters scores the visual tokens; the drop
      applies to its output, so the shorter sequence enters layer ℓ + 1 (``stats()`` reports the stage at
      layer ℓ + 1). The attention rows are recomputed from layer ℓ's q/k (no eager attention).
    * Schedules: the official ``sparse_token_dict`` per version for budgets 64 / 96 / 128 / 192 on 576 tokens
      and 32 layers (v1.5: 192 → 300, 200, 110; 128 → 303, 110, 36; 96 → 238, 48, 26; 64 → 66, 30, 17;
      v2.0: 192 → 300, 200, 118; 128 → 238, 108, 60; 96 → 246, 54, 28; 64 → 66, 34, 20). These are the
      official labels: the official log counts layer ℓ as already pruned and v1.5 adds its recycled tokens,
      so the equivalent tokens ``stats()`` measures are higher (v1.5 at 128: 140.8 before recycling; v2.0 at
      128: 144.1). Other budgets and shapes: the nearest official shape, scaled so that the layer-averaged
      visual count equals the budget (``keep`` gives the counts, one per layer of ``layers``).
    * ``version="1.5"``: score = head-mean attention, then the mean over raters. Of the n dropped tokens the
      int(0.3·n) + 1 best-scored (``recycle`` = 0.3; 0 turns recycling off) are clustered by DPC-KNN (k
      neighbours = the number of clusters, the token itself included) into int(m/10) + 1 clusters whose
      means (of layer ℓ's output) are inserted after the kept visual tokens, in descending density·distance
      order of their centres; they are counted in ``stats()`` (``merged``) and are candidates at the later
      stages. Compact positions (the official code truncates the position ids to the new length).
    * ``version="2.0"`` (SparseVLM+): the attention of each head is divided by the raw RoPE logits of
      all-ones queries and keys (q·k/√dh, no softmax); the ``heads`` (14) heads with the largest sum of that
      corrected attention from the raters to the visual tokens are averaged, then the raters. No recycling.
      Original positions.

    Default ``"1.5"``: the official README presents v1.5 as SparseVLM (the ICML 2025 paper, arXiv 2410.04417)
    and SparseVLM+ as a separate, later paper, and the official code runs v1.5 unless ``USE_VERSION=2_0``. The ints ``version=1`` / ``2`` of
    earlier vtprune releases still work (DeprecationWarning) and mean ``"1.5"`` / ``"2.0"``.

    Deliberate differences from the official code: any batch size with padding (official: one sample); the
    image need not be 576 tokens nor come first, several images are scored together (the recycled tokens are
    inserted after the last visual token); fp32 scores; when no relevance is above the mean (a single text
    token), the most relevant text token rates alone (official: NaN scores); exactly tied densities are
    ordered by index (official: random noise of 1e-6 decides; with 2 clusters mutual nearest neighbours always
    tie, so the official merged tokens are then not reproducible — vtprune's are one of its outcomes); cluster means divide by the count (official:
    count + 1e-6); exactly tied scores keep the earlier token; a stage whose count is at least the visual
    tokens present keeps them all (official: all but one); fewer than 14 heads: all heads (official: error).
    ``positions=`` overrides each version's position convention (with ``"original"`` the recycled tokens take
    the position of the last visual token). ``layers`` names the official layers ℓ (in earlier releases it named
    the layer the drop entered, and that layer's attention scored the tokens).
    """

    name = "sparsevlm"
    paper = "arXiv:2410.04417"
    signals = ("decoder_attention",)
    options = {"version": "1.5", "layers": None, "keep": None, "heads": 14, "recycle": 0.3}
    default_budget = 64
    default_positions = _SPARSEVLM_POSITIONS["1.5"]

    def __init__(self, budget=None, positions: str | None = None, seed: int = 0, **options: Any):
        if "version" in options:
            options["version"] = _sparsevlm_version(options["version"])
        version = options.get("version", self.options["version"])
        if positions is None and version in _SPARSEVLM_POSITIONS:
            positions = _SPARSEVLM_POSITIONS[version]
        super().__init__(budget, positions, seed, **options)

    def validate_options(self) -> None:
        cfg = self.config
        if cfg["version"] not in _SPARSEVLM_SCHEDULES:
            raise MethodOptionError(f"sparsevlm version={cfg['version']!r} must be \"1.5\" or \"2.0\" (SparseVLM+).")
        layers, keep = cfg["layers"], cfg["keep"]
        if layers is not None and not _ascending_layers(layers, minimum=0):
            raise MethodOptionError(f"sparsevlm layers={layers!r} must be ascending decoder layer indices ≥ 0 (the "
                                    "layers whose attention scores the tokens; the drop takes effect at the next).")
        if keep is not None:
            if (not isinstance(keep, list | tuple) or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                          for x in keep) or list(keep) != sorted(keep, reverse=True)):
                raise MethodOptionError(f"sparsevlm keep={keep!r} must be non-increasing positive token counts.")
            if layers is None or len(layers) != len(keep):
                raise MethodOptionError("sparsevlm keep= needs layers= of the same length (one count per stage).")
        if isinstance(cfg["heads"], bool) or not isinstance(cfg["heads"], int) or cfg["heads"] < 1:
            raise MethodOptionError(f"sparsevlm heads={cfg['heads']!r} must be a positive int (paper: 14).")
        if (isinstance(cfg["recycle"], bool) or not isinstance(cfg["recycle"], int | float)
                or not 0.0 <= cfg["recycle"] <= 1.0):
            raise MethodOptionError(f"sparsevlm recycle={cfg['recycle']!r} must be a fraction in [0, 1].")

    def _score_layers(self, num_layers: int) -> list[int]:
        """The official layers ℓ (whose attention scores the tokens), each followed by at least one layer."""
        if self.config["layers"] is not None:
            layers = list(self.config["layers"])
            if layers[-1] + 1 >= num_layers:
                raise MethodOptionError(
                    f"sparsevlm layers={layers} reach beyond this model's {num_layers} decoder layers: the drop after "
                    f"layer ℓ takes effect at layer ℓ + 1, so ℓ must be at most {num_layers - 2}.")
            return layers
        layers: list[int] = []
        for published in _SPARSEVLM_STAGES:  # scale 2, 6, 15 of 32 to this depth, strictly increasing
            layer = max(round(published * num_layers / 32), layers[-1] + 1 if layers else 0)
            if layer + 1 < num_layers:
                layers.append(layer)
        return layers

    def budget_overrides(self) -> list[str]:
        return ["keep"] if self.config["keep"] is not None else []

    def pruning_layers(self, num_layers: int) -> list[int]:
        layers = self._score_layers(num_layers)
        if not layers:
            raise MethodOptionError(f"sparsevlm needs a decoder with at least 2 layers to prune inside it; this "
                                    f"model has {num_layers}; use a pre-LLM method.")
        return [layer + 1 for layer in layers]

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        layers = self.pruning_layers(num_layers)
        images = max(num_images, 1)
        if self.config["keep"] is not None:
            return [(layer, min(num_visual, count * images))
                    for layer, count in zip(layers, self.config["keep"], strict=True)]
        table = _SPARSEVLM_SCHEDULES[self.config["version"]]
        target = self._target_equivalent(num_visual, num_images)
        published = (num_layers == 32 and num_visual == 576 * images
                     and self._score_layers(num_layers) == list(_SPARSEVLM_STAGES))
        if published and isinstance(self.budget, int) and self.budget in table:
            return [(layer, count * images) for layer, count in zip(layers, table[self.budget], strict=True)]
        # shape: the published schedule nearest in budget fraction (linear between them), as fractions of N
        anchors = sorted(table)
        fraction = target / num_visual * 576
        lo = max([a for a in anchors if a <= fraction], default=anchors[0])
        hi = min([a for a in anchors if a >= fraction], default=anchors[-1])
        t = 0.0 if hi == lo else (fraction - lo) / (hi - lo)
        shape = [((1 - t) * x + t * y) / 576 for x, y in zip(table[lo], table[hi], strict=True)][: len(layers)]
        # scale the shape so that the layer average equals the target; stages that would exceed N are capped
        # at N and the scale is solved again over the others
        spans = [b - a for a, b in zip(layers, [*layers[1:], num_layers], strict=True)]
        fixed: dict[int, float] = {}
        while True:
            free = [i for i in range(len(shape)) if i not in fixed]
            spent = layers[0] * num_visual + sum(spans[i] * fixed[i] for i in fixed)
            weighted = sum(spans[i] * shape[i] for i in free) * num_visual
            scale = (target * num_layers - spent) / weighted if weighted else 0.0
            capped = [i for i in free if scale * shape[i] >= 1.0]
            if not capped:
                break
            fixed.update({i: float(num_visual) for i in capped})
        if fixed == {} and scale <= 0:
            raise BudgetError(
                f"sparsevlm keeps all {num_visual} visual tokens for its first {layers[0]} layers, so the smallest "
                f"reachable budget is {layers[0] * num_visual / num_layers:.1f} equivalent tokens; raise the "
                "budget or pass layers=."
            )
        counts, previous = [], num_visual
        for i, f in enumerate(shape):
            count = fixed.get(i, scale * f * num_visual)
            previous = max(1, min(previous, round(count)))
            counts.append(previous)
        return list(zip(layers, counts, strict=True))

    def prepare(self, inputs_embeds, real, visual, text, source) -> list[torch.Tensor]:
        """Per sample: original positions of the raters (text after the first visual token, else all text)."""
        raters = []
        for b in range(inputs_embeds.shape[0]):
            vis = torch.nonzero(visual[b]).flatten()
            txt = torch.nonzero(text[b]).flatten()
            if vis.numel() == 0 or txt.numel() == 0:
                raters.append(torch.empty(0, dtype=torch.long))
                continue
            after = txt[txt > vis.min()]
            txt = after if after.numel() else txt
            chosen = select_raters(inputs_embeds[b, vis], inputs_embeds[b, txt])
            columns = torch.nonzero(real[b]).flatten()
            index = torch.searchsorted(columns, txt[chosen]).cpu()
            raters.append(source[b][index])
        return raters

    def _rater_scores(self, ctx: LayerContext) -> torch.Tensor:
        """[B, L] score of every column from layer ℓ = ``ctx.layer − 1``'s attention (see the class doc)."""
        batch = ctx.real.shape[0]
        rater_columns = []
        for b in range(batch):
            columns = torch.nonzero(ctx.real[b]).flatten()
            is_rater = torch.isin(ctx.source[b], ctx.prepared[b]).to(columns.device)
            found = columns[is_rater]
            rater_columns.append(found if found.numel() else ctx.last[b])
        width = max(r.numel() for r in rater_columns)
        query = torch.stack([torch.cat([r, r[:1].expand(width - r.numel())]) for r in rater_columns])  # [B, Q]
        weight = torch.stack([torch.arange(width) < r.numel() for r in rater_columns]).to(ctx.hidden.device)
        weight = weight.float() / weight.sum(-1, keepdim=True)  # [B, Q], mean over the real raters
        layer = ctx.layers[ctx.layer - 1]
        hidden, position_embeddings = ctx.previous_hidden, ctx.previous_position_embeddings
        rows = attention_rows(layer, hidden, position_embeddings, query, key_padding_mask=ctx.real)  # [B, H, Q, L]
        if self.config["version"] == "1.5":
            return head_mean_scores(rows, weight)
        rope_logits = rope_only_rows(layer, position_embeddings, query, key_padding_mask=ctx.real, softmax=False)
        return debiased_scores(rows, rope_logits, weight, ctx.visual, self.config["heads"])

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return self._rater_scores(ctx)

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        scores = self._rater_scores(ctx)
        selections = top_scored(ctx, scores, wanted)
        if self.config["version"] != "1.5" or not self.config["recycle"]:
            return selections
        for b, selection in enumerate(selections):
            if selection is None:
                continue
            candidates = torch.nonzero(ctx.visual[b]).flatten()
            dropped = candidates[~torch.isin(candidates, selection.keep)]
            if dropped.numel() == 0:
                continue
            # recycled from layer ℓ's output (the input of this layer), inserted after the last visual token
            selection.merged = recycle(ctx.hidden[b, dropped], scores[b, dropped], self.config["recycle"])
            selection.anchors = candidates[-1:].expand(selection.merged.shape[0])
        return selections


#: TransPrune's official schedule (scripts/transprune/v1_5_test/*.sh, LLaVA-1.5-7B, 32 decoder layers): prune
#: after 1-indexed layers 7, 9, 12 (= before 0-indexed layers 7, 9, 12) to these fractions of the visual tokens
_TRANSPRUNE_LAYERS = (7, 9, 12)
_TRANSPRUNE_RATIOS = (0.875, 0.625, 0.125)
_TRANSPRUNE_DEPTH = 32


@dataclass
class _Transitions:
    """Per sample: the accumulated token transition weight of every original sequence position (float32)."""

    totals: list[torch.Tensor]


@register_method
class TransPrune(LayerMethod):
    """TransPrune — prune visual tokens by how much the decoder transforms them (token transition) plus
    instruction-guided attention (Li et al., CVPR 2026, arXiv 2507.20630). Official code: liaolea/TransPrune @
    c9e8284 (``llava/model/modeling_llama_transprune.py``: ``compute_transf_weight`` L914-927, accumulation
    and schedule L1306-1393, ``transprune_rank_drop`` L1425-1594; defaults in ``scripts/transprune/v1_5_test/
    *.sh`` and ``llava/eval/model_vqa_loader.py`` L94-97, L156-158).

    Token transition variation (TTV): for each decoder layer of the window (``accumulate``; default the
    official 1-indexed layers 7-12, i.e. 0-indexed 6-11) and for both sublayers (attention, MLP), with x the
    sublayer's input (after its pre-norm) and y its output: w = (‖y‖/‖x‖) · softmax over the sequence of
    (1 − cos(x, y)); the weights of both sublayers and all window layers seen so far are summed per token (read
    through removable forward hooks on the layers' ``self_attn`` / ``mlp``). Instruction-guided attention
    (IGA): at a pruning layer k, the attention of the instruction tokens (the text after the last image, to the
    end of the prompt) over all keys, recomputed from layer k's input norm + q/k + RoPE (no eager attention),
    mean over heads, mean over those queries, read at the visual tokens. Score = TTV/ΣTTV + IGA/ΣIGA over the
    visual tokens still present; the top tokens are kept (sorted). Positions ``compact`` by default (the official
    re-indexes to ``arange`` after every drop); ``positions="original"`` keeps the original ones.

    Schedule: ``layers`` (official ``pruning_layer_list``, here the 0-indexed layer the drop enters: [7, 9, 12])
    with ``ratios`` (official ``image_token_ratio_list``: [0.875, 0.625, 0.125] of the N visual tokens, kept count
    ``int(N·ratio)``: 576 → 504 → 360 → 72). Without ``ratios``, an int / float budget (equivalent visual tokens
    averaged over the layers, like the other in-LLM methods) bends the official ratios so that the layer
    average meets the budget: scaled to s·r_i below the official list's average (236.25 of 576 tokens on 32
    layers), raised to r_i^γ (γ < 1) above it, so no stage keeps every token; ``ratios`` overrides the budget.
    A budget below the tokens the first k layers process in full (k·N/L) is refused with a clear error.

    Deviations: (1) the official code only runs 32-layer LLaVA-1.5 (Vicuna-7B); on another depth L the default
    layers are the official ones scaled, round(l·L/32) clamped to 1..L−1 (duplicates merged, the later ratio
    wins), and the default window runs from the first to the last pruning layer minus one. (2) The official
    softmax of the direction change sums over the whole batch tensor (padding included; its TTV re-gather only
    supports batch size 1) — here it runs over each sample's real tokens, identical for one unpadded sample.
    (3) Weights are computed in float32 (the official keeps the model dtype). (4) Several images per sample:
    the instruction queries are the text after the last image and all images' tokens compete together.
    Fidelity: tests/test_transprune.py re-implements the official scoring literally and compares kept sets.
    """

    name = "transprune"
    paper = "arXiv:2507.20630"
    signals = ("decoder_attention",)
    options = {"layers": None, "ratios": None, "accumulate": None}
    default_budget = None  # official ratios [0.875, 0.625, 0.125]
    default_positions = "compact"

    def validate_options(self) -> None:
        layers, ratios, accumulate = self.config["layers"], self.config["ratios"], self.config["accumulate"]
        if layers is not None and not _ascending_layers(layers, minimum=1):
            raise MethodOptionError(f"transprune layers={layers!r} must be ascending decoder layer indices ≥ 1 "
                                    "(the layer each drop enters).")
        if ratios is not None:
            if (not isinstance(ratios, list | tuple) or not ratios
                    or any(isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r <= 1.0
                           for r in ratios)
                    or any(a < b for a, b in zip(ratios, ratios[1:], strict=False))):
                raise MethodOptionError(f"transprune ratios={ratios!r} must be non-increasing fractions of the "
                                        "visual tokens in [0, 1], one per pruning layer.")
            expected = len(layers) if layers is not None else len(_TRANSPRUNE_LAYERS)
            if len(ratios) != expected:
                raise MethodOptionError(f"transprune ratios={list(ratios)} needs one ratio per pruning layer "
                                        f"({expected}); pass as many ratios as layers.")
        if accumulate is not None and (not isinstance(accumulate, list | tuple) or not accumulate or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in accumulate)):
            raise MethodOptionError(f"transprune accumulate={accumulate!r} must be a non-empty list of decoder "
                                    "layer indices ≥ 0 (the layers whose token transition is summed).")

    def budget_overrides(self) -> list[str]:
        return ["ratios"] if self.config["ratios"] is not None else []

    def _stages(self, num_layers: int) -> list[tuple[int, float]]:
        """[(layer, official ratio), ...] on a decoder of ``num_layers`` layers (see the class doc)."""
        ratios = self.config["ratios"] or _TRANSPRUNE_RATIOS
        if self.config["layers"] is not None:
            layers = list(self.config["layers"])
            if layers[-1] >= num_layers:
                raise MethodOptionError(
                    f"transprune layers={layers} reach beyond this model's {num_layers} decoder layers "
                    f"(0..{num_layers - 1}); pass layers= below {num_layers}"
                    + ("" if num_layers > 1 else ", or use a pre-LLM method") + ".")
        else:
            if num_layers < 2:
                raise MethodOptionError(f"transprune needs at least 2 decoder layers (this model has {num_layers}); "
                                        "use a pre-LLM method.")
            layers = [min(num_layers - 1, max(1, round(x * num_layers / _TRANSPRUNE_DEPTH)))
                      for x in _TRANSPRUNE_LAYERS]
        stages: dict[int, float] = {}
        for layer, ratio in zip(layers, ratios, strict=True):
            stages[layer] = float(ratio)  # merged duplicates: the later (smaller) ratio wins
        return sorted(stages.items())

    def pruning_layers(self, num_layers: int) -> list[int]:
        layers = [layer for layer, _ in self._stages(num_layers)]
        accumulate = self.config["accumulate"]
        if accumulate is not None and max(accumulate) >= layers[-1]:
            raise MethodOptionError(f"transprune accumulate={list(accumulate)} must lie before the last pruning "
                                    f"layer {layers[-1]} (later layers cannot influence the drop).")
        return layers

    def observed_layers(self, num_layers: int) -> list[int]:
        if self.config["accumulate"] is not None:
            return sorted(set(self.config["accumulate"]))
        layers = [layer for layer, _ in self._stages(num_layers)]
        return list(range(layers[0] - 1, layers[-1]))

    @staticmethod
    def _bent(stages: list[tuple[int, float]], t: float) -> list[float]:
        """The official ratios bent by ``t`` ∈ [0, 2]: t·r below 1 (fewer tokens), r^(2−t) above (more tokens,
        never reaching all of them); t = 1 is the official list, the layer average grows with t."""
        return [ratio * t if t <= 1.0 else ratio ** (2.0 - t) for _, ratio in stages]

    @staticmethod
    def _equivalent(ratios: list[float], stages: list[tuple[int, float]], num_layers: int, num_visual: int) -> float:
        bounds = [0] + [layer for layer, _ in stages] + [num_layers]
        ratios = [1.0, *ratios]
        return sum((bounds[i + 1] - bounds[i]) * num_visual * ratios[i] for i in range(len(ratios))) / num_layers

    def plan_schedule(self, num_layers: int, num_visual: int, num_images: int) -> list[tuple[int, int]]:
        stages = self._stages(num_layers)
        ratios = [ratio for _, ratio in stages]
        if self.config["ratios"] is None and self.budget is not None:
            target = self._target_equivalent(num_visual, num_images)
            minimum = stages[0][0] * num_visual / num_layers
            if target < minimum:
                raise BudgetError(
                    f"transprune keeps all {num_visual} visual tokens for its first {stages[0][0]} layers, so the "
                    f"smallest reachable budget is {minimum:.1f} equivalent tokens; raise the budget, move the "
                    "stages earlier (layers=), or pass ratios=."
                )
            lo, hi = 0.0, 2.0
            for _ in range(80):
                mid = (lo + hi) / 2
                below = self._equivalent(self._bent(stages, mid), stages, num_layers, num_visual) < target
                lo, hi = (mid, hi) if below else (lo, mid)
            ratios = self._bent(stages, (lo + hi) / 2)
        return [(layer, int(num_visual * ratio + _PDROP_EPSILON)) for (layer, _), ratio in zip(stages, ratios,
                                                                                                  strict=True)]

    def prepare(self, inputs_embeds, real, visual, text, source) -> _Transitions:
        return _Transitions(totals=[torch.zeros(int(s.max()) + 1 if s.numel() else 0, dtype=torch.float32,
                                                device=inputs_embeds.device) for s in source])

    def observe(self, layer, kind, before, after, real, source, prepared: _Transitions) -> None:
        weight = transition_weight(before, after, real)  # [B, L]
        for b, totals in enumerate(prepared.totals):
            columns = torch.nonzero(real[b]).flatten()
            totals.index_add_(0, source[b].to(totals.device), weight[b, columns].to(totals.device))

    def _instruction_attention(self, ctx: LayerContext) -> torch.Tensor:
        """[B, L]: attention of each sample's instruction tokens, mean over heads and queries (class doc)."""
        queries = []
        for b in range(ctx.real.shape[0]):
            columns = torch.nonzero(ctx.real[b]).flatten()
            visual_columns = torch.nonzero(ctx.visual[b]).flatten()
            after = ctx.text[b] & ctx.real[b]
            if visual_columns.numel():
                after = after & (torch.arange(after.numel(), device=after.device) > visual_columns[-1])
            found = torch.nonzero(after).flatten()
            queries.append(found if found.numel() else columns[-1:])
        width = max(q.numel() for q in queries)
        query = torch.stack([torch.cat([q, q[:1].expand(width - q.numel())]) for q in queries])  # [B, Q]
        weight = torch.stack([torch.arange(width) < q.numel() for q in queries]).to(ctx.hidden.device)
        weight = weight.float() / weight.sum(-1, keepdim=True)  # [B, Q], mean over the real queries
        rows = attention_rows(ctx.layers[ctx.layer], ctx.hidden, ctx.position_embeddings, query,
                              key_padding_mask=ctx.real, average_heads=True)  # [B, Q, L]
        return (rows * weight.unsqueeze(-1)).sum(dim=1)  # [B, L]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = self._instruction_attention(ctx)
        scores = torch.zeros_like(attention)
        for b in range(attention.shape[0]):
            candidates = torch.nonzero(ctx.visual[b]).flatten()
            scores[b, candidates] = transprune_scores(self._transitions(ctx, b, candidates), attention[b, candidates])
        return scores

    def select(self, ctx: LayerContext, wanted: list[int | None]) -> list[LayerSelection | None]:
        attention = self._instruction_attention(ctx)
        out: list[LayerSelection | None] = []
        for b, k in enumerate(wanted):
            if k is None:
                out.append(None)
                continue
            candidates = torch.nonzero(ctx.visual[b]).flatten()
            chosen = transprune_select(self._transitions(ctx, b, candidates), attention[b, candidates], k)
            out.append(LayerSelection(keep=candidates[chosen.to(candidates.device)]))
        return out

    @staticmethod
    def _transitions(ctx: LayerContext, b: int, candidates: torch.Tensor) -> torch.Tensor:
        """The accumulated transition weight of sample ``b``'s candidate columns [N]."""
        columns = torch.nonzero(ctx.real[b]).flatten()
        original = torch.full((ctx.real.shape[1],), -1, dtype=torch.long, device=columns.device)
        original[columns] = ctx.source[b].to(columns.device)
        totals = ctx.prepared.totals[b]
        return totals[original[candidates].to(totals.device)]
